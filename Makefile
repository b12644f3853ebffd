# Two commands set everything up on a fresh machine: `make chat` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: chat test aot bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

chat: $(STAMP)
	$(VENV)/bin/tinymoe chat

test: $(STAMP)
	$(PY) -m pytest tests

aot: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m tinymoe.kernels.aot --arch 80,90

clean:
	rm -rf $(VENV) build *.egg-info
