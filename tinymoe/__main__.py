"""`python -m tinymoe` is the `tinymoe` command."""
from .cli import main

main()
