"""The `tinymoe` command: chat, generate, models (and the routing commands at the end)."""
import functools
import os
import sys
from dataclasses import dataclass, field

import click

DEBUG_KEY = "tinymoe.debug"


class Group(click.Group):
    """Errors become one line (`Error: ...`); `--debug` shows the traceback instead."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            ctx.exit(130)
        except Exception as e:
            if ctx.meta.get(DEBUG_KEY):
                raise
            lines = str(e).strip().splitlines()
            click.echo(f"Error: {lines[0] if lines else type(e).__name__}", err=True)
            ctx.exit(1)


def _set_debug(ctx, _param, value):
    if value:
        ctx.meta[DEBUG_KEY] = True
    return value


def parse_value(text: str):
    """'3' -> 3, '0.5' -> 0.5, 'true'/'false' -> bool, anything else stays a string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_router_opts(_ctx, _param, values) -> dict:
    opts = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        opts[key.strip().replace("-", "_")] = parse_value(value.strip())
    return opts


@dataclass
class EngineOptions:
    """What `engine_options` collects: how to build the LLM."""
    router: str = "topk"
    router_opts: dict = field(default_factory=dict)
    calib: str | None = None
    dtype: str | None = None
    debug: bool = False
    plan_name: str | None = None
    plan_opts: dict = field(default_factory=dict)
    quant: str | None = None
    ep: int = 1
    placement: str = "contiguous"

    @property
    def plan(self):
        """The `plan` argument of LLM / routing.install: None, a name, or (name, options)."""
        if self.plan_name is None:
            return None
        return (self.plan_name, self.plan_opts) if self.plan_opts else self.plan_name

    def llm(self, model: str, **engine_kwargs):
        """The engine for `model` with these options, with a progress bar while loading."""
        from .engine import LLM
        return LLM(model, router=self.router, dtype=self.dtype, calib=self.calib, progress=True,
                   plan=self.plan, router_opts=self.router_opts, quant=self.quant, expert_parallel=self.ep,
                   placement=self.placement, **engine_kwargs)


def _check_quant(_ctx, param, value):
    """--quant: a bad spec is one line before anything loads."""
    if value is None:
        return None
    from .models.quantize import parse_quant
    try:
        parse_quant(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param=param) from None
    return value


QUANT_SPECS = ("int8, int4 (its LM head int8), int4:g32 (group 32, 64 or 128), or per part "
               "experts=int4,shared=int8,dense=int8,attn=int8,head=int8 (unnamed parts stay full; gates "
               "and embeddings always do)")
QUANT_HELP = ("quantise weights while loading: " + QUANT_SPECS +
              "; a checkpoint from `tinymoe quantize` loads as written")


def _check_placement(_ctx, param, value):
    from .experts.placement import parse_placement
    try:
        parse_placement(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param=param) from None
    return value


def quant_option(f):
    return click.option("--quant", default=None, metavar="SPEC", callback=_check_quant, help=QUANT_HELP)(f)


def engine_options(f):
    """--router, --router-opt KEY=VALUE (repeatable), --plan, --plan-opt KEY=VALUE (repeatable),
    --calib, --dtype, --quant, --ep, --placement, --debug; the command receives them as one
    `engine: EngineOptions` argument."""
    @functools.wraps(f)
    def wrapper(*args, router, router_opt, plan, plan_opt, calib, dtype, quant, ep, placement, debug, **kwargs):
        if plan_opt and plan is None:
            raise click.UsageError("--plan-opt needs --plan")
        engine = EngineOptions(router, router_opt, calib, dtype, debug, plan, plan_opt, quant, ep, placement)
        if plan is not None:  # a bad plan name or option fails before the model loads
            from .routing import plan_spec
            plan_spec(engine.plan)
        return f(*args, engine=engine, **kwargs)
    for option in reversed([
        click.option("--router", default="topk", show_default=True, help="routing algorithm (see `tinymoe bench`)"),
        click.option("--router-opt", multiple=True, callback=_parse_router_opts, metavar="KEY=VALUE",
                     help="router option, repeatable (e.g. --router-opt t_fix=0.3)"),
        click.option("--plan", default=None, metavar="NAME",
                     help="expert plan over the router's choice: rnq (replicate and quantise; needs --calib "
                          "outside bench); --router rnq is --router topk --plan rnq"),
        click.option("--plan-opt", multiple=True, callback=_parse_router_opts, metavar="KEY=VALUE",
                     help="plan option, repeatable (e.g. --plan-opt replica=int4)"),
        click.option("--calib", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="calibration file from `tinymoe calibrate`"),
        click.option("--dtype", default=None, help="weights dtype (default: the checkpoint's)"),
        click.option("--quant", default=None, metavar="SPEC", callback=_check_quant, help=QUANT_HELP),
        click.option("--ep", default=1, show_default=True, type=click.IntRange(min=1), metavar="G",
                     help="expert parallelism over G ranks (processes over torch.distributed, one CPU thread "
                          "each unless --threads; inside torchrun, its ranks)"),
        click.option("--placement", default="contiguous", show_default=True, callback=_check_placement,
                     metavar="NAME", help="which rank holds each expert under --ep: contiguous, eplb (replicas of "
                                          "the most loaded experts, one a rank; eplb:R for R; needs --calib "
                                          "outside bench)"),
        click.option("--debug", is_flag=True, callback=_set_debug, expose_value=True, is_eager=True,
                     help="show tracebacks"),
    ]):
        wrapper = option(wrapper)
    return wrapper


def sampling_options(temperature: float, max_tokens: int):
    def deco(f):
        for option in reversed([
            click.option("--max-tokens", default=max_tokens, show_default=True, type=int),
            click.option("--temperature", default=temperature, show_default=True, type=float, help="0: greedy"),
            click.option("--top-p", default=1.0, show_default=True, type=float),
            click.option("--top-k", default=0, show_default=True, type=int, help="0: off"),
            click.option("--min-p", default=0.0, show_default=True, type=float),
            click.option("--repetition-penalty", default=1.0, show_default=True, type=float),
            click.option("--seed", default=None, type=int),
            click.option("--stop", multiple=True, help="stop at this text (repeatable)"),
        ]):
            f = option(f)
        return f
    return deco


def _params(kw: dict):
    from .engine import SamplingParams
    names = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    return SamplingParams(**{n: kw.pop(n) for n in names}, stop=list(kw.pop("stop")))


def _stats(out) -> str:
    return (f"[{len(out.token_ids)} tokens, {out.decode_tokens_per_s:.1f} tok/s, "
            f"first token {out.time_to_first_token:.2f} s, {out.finish_reason}]")


def _print_stream(stream, strip_leading=False) -> str:
    text = ""
    for piece in stream:
        if strip_leading and not text:
            piece = piece.lstrip()
        text += piece
        click.echo(piece, nl=False)
    click.echo()
    return text


def _drop_oldest_turns(llm, messages: list[dict], keep: int) -> bool:
    """Drop the oldest user/assistant turns after the first `keep` messages until the conversation
    leaves room for a reply in the context; whether any were dropped. The last message must fit alone."""
    dropped = False
    while len(llm.chat_prompt(messages)) >= llm.max_model_len:
        del messages[keep:keep + 2]
        dropped = True
    return dropped


@click.group(cls=Group)
@click.option("--debug", is_flag=True, callback=_set_debug, is_eager=True, help="show tracebacks")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads, fixed (default: TINYMOE_THREADS, else the cores less those other work keeps "
                   "busy, re-checked every half second)")
@click.option("--wait-policy", type=click.Choice(["passive", "spin", "active"]), default=None,
              help="how idle OpenMP threads wait: passive sleeps at once, spin spins 10000 rounds then sleeps, "
                   "active spins (default: TINYMOE_WAIT_POLICY, else spin); OMP_WAIT_POLICY or GOMP_SPINCOUNT, "
                   "if set, win")
def cli(debug, threads, wait_policy):
    """tinymoe: a small inference engine for Mixture-of-Experts language models."""
    from dataclasses import replace
    from .settings import Settings, install, omp_environment
    chosen = Settings.from_env()  # the TINYMOE_* variables, checked before any command's work
    given = {k: v for k, v in (("threads", threads), ("wait_policy", wait_policy)) if v is not None}
    chosen = replace(chosen, **given)
    if "torch" not in sys.modules:  # libgomp reads its variables once, when torch loads it
        os.environ.update(omp_environment(chosen.wait_policy))
    install(chosen)


@cli.command()
@click.argument("model", default="tiny")
@click.option("--prompt", "-p", default=None, help="answer this one message and exit")
@click.option("--system", default=None, help="system message")
@click.option("--interactive", "-i", is_flag=True, help="keep the conversation loop even if stdin is not a terminal")
@click.option("--max-model-len", type=click.IntRange(min=2), default=None,
              help="context in tokens (default: the model's); older turns are dropped past it")
@sampling_options(temperature=0.7, max_tokens=512)
@engine_options
def chat(model, prompt, system, interactive, max_model_len, engine, **kw):
    """Chat with MODEL (default: the embedded tiny model). /reset clears, /exit leaves.

    With --prompt, or with text on standard input, answers once without the interactive loop.
    When the conversation outgrows the context, its oldest turns are dropped (the system message
    stays)."""
    params = _params(kw)
    if prompt is not None and not prompt.strip():
        raise click.UsageError("the prompt is empty")
    if prompt is None and not interactive and not sys.stdin.isatty():
        prompt = sys.stdin.read()
        if not prompt.strip():
            click.echo("Nothing on standard input to answer (use -i for the interactive loop).", err=True)
            return
    llm = engine.llm(model, max_model_len=max_model_len)
    start = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        stream = llm.chat(start + [{"role": "user", "content": prompt.strip()}], params, stream=True)
        _print_stream(stream, strip_leading=True)
        click.echo(_stats(stream.output), err=True)
        return
    click.echo("Type a message; /reset clears the conversation, /exit leaves.", err=True)
    messages, told = list(start), False
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            messages = list(start)
            click.echo("(conversation cleared)", err=True)
            continue
        if not command:
            continue
        message = {"role": "user", "content": line}
        alone = len(llm.chat_prompt(start + [message]))
        if alone >= llm.max_model_len:
            click.echo(f"(that message alone takes {alone} tokens, the context holds {llm.max_model_len}: "
                       "not sent; the conversation is kept)", err=True)
            continue
        messages.append(message)
        if _drop_oldest_turns(llm, messages, len(start)) and not told:
            click.echo(f"(older turns dropped to fit the context of {llm.max_model_len} tokens)", err=True)
            told = True
        stream = llm.chat(messages, params, stream=True)
        try:
            reply = _print_stream(stream, strip_leading=True)
        except KeyboardInterrupt:
            click.echo("\n(reply interrupted)", err=True)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
        click.echo(_stats(stream.output), err=True)


@cli.command()
@click.argument("model")
@click.option("--prompt", "-p", "prompts", multiple=True, required=True,
              help="text to continue; repeat to generate several in one batch")
@sampling_options(temperature=0.0, max_tokens=128)
@engine_options
def generate(model, prompts, engine, **kw):
    """Continue each --prompt with MODEL."""
    params = _params(kw)
    llm = engine.llm(model)
    if len(prompts) == 1:
        stream = llm.stream(prompts[0], params)
        _print_stream(stream)
        click.echo(_stats(stream.output), err=True)
        return
    try:
        outs = llm.generate(list(prompts), params)
    except KeyboardInterrupt as e:  # print what was generated, then the group exits with 130
        _print_outputs(prompts, getattr(e, "outputs", []))
        raise
    _print_outputs(prompts, outs)


def _print_outputs(prompts, outs):
    for i, out in enumerate(outs):
        click.echo(f"--- {i}: {prompts[i]}")
        click.echo(out.text)
        click.echo(_stats(out), err=True)


@cli.command()
def models():
    """The model aliases and whether each is on this machine."""
    from .weights import ALIASES, resolve
    width = max(map(len, ALIASES))
    for alias, target in ALIASES.items():
        try:
            where = f"found   {resolve(alias)}"
        except ValueError:
            where = f"missing {target}"
        click.echo(f"{alias:<{width}}  {where}")


def main():
    cli(prog_name="tinymoe")


# --- routing commands (routing engineer) ---


def _windows_bar(tokens, seq_len: int):
    """A bar on stderr for calibrate(), which runs max(1, tokens // seq_len) windows."""
    from .progress import bar
    return bar(total=max(1, tokens.numel() // seq_len), desc="calibrate", unit="window")


def _load(model: str, dtype, quant=None):
    from . import load_model, load_tokenizer
    return load_model(model, dtype=dtype, progress=True, quant=quant), load_tokenizer(model)


def _load_checked(model: str, engine: EngineOptions, check_router: bool = True, weights: bool = True):
    """_load, with --calib read and checked against the model's config, and the router's options
    against its layers, before the weights; the calibration's gate fingerprint after them.
    `weights=False`: the checks that need no weights only (engine.calib is then the file read)."""
    from .config import load_config
    from .routing import check_before_loading
    from .routing.calibrate import load_calibration
    from .weights import resolve
    cfg = load_config(resolve(model))
    calib = load_calibration(engine.calib) if engine.calib is not None else None
    if calib is not None:
        calib.check_config(cfg)
    if check_router:
        check_before_loading(cfg, engine.router, None, engine.plan, **engine.router_opts)
    if not weights:
        engine.calib = calib
        return None
    net, tok = _load(model, engine.dtype, engine.quant)
    if calib is not None:
        calib.check(net)
        engine.calib = calib
    return net, tok


def _ep_threads() -> int:
    """CPU threads of each expert-parallel rank: --threads if given, else one."""
    from .settings import current
    return current().threads or 1


def _int_list(_ctx, _param, value: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{value!r}: give positive integers")
    return out


def _output_file(_ctx, param, value):
    """--out / --plot: the folder must exist and be writable (and a plot's format be known) before any
    loading, not after the whole run."""
    if value is None:
        return value
    import os
    folder = os.path.dirname(value) or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise click.BadParameter(f"{folder} is not a folder", param=param)
    if not os.path.isdir(folder):
        raise click.BadParameter(f"folder {folder} does not exist (create it first)", param=param)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.BadParameter(f"folder {folder} is not writable", param=param)
    if param.name == "plot":
        from matplotlib.backend_bases import FigureCanvasBase
        kinds = FigureCanvasBase.get_supported_filetypes()
        ext = os.path.splitext(value)[1].lstrip(".").lower()
        if ext and ext not in kinds:
            raise click.BadParameter(f"cannot write a .{ext} image; use one of {', '.join(sorted(kinds))}",
                                     param=param)
    return value


def _default_data(model) -> str:
    from .weights import ASSETS
    path = ASSETS / "data" / "heldout.txt"
    if not path.is_file():
        raise click.UsageError(f"no --data given and no held-out text at {path}")
    return str(path)


@cli.command()
@click.argument("model")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="calibration text")
@click.option("--out", required=True, type=click.Path(dir_okay=False), callback=_output_file,
              help="calibration file to write")
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(min=1), help="tokens a window")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1), help="windows a forward pass")
@click.option("--max-tokens", default=65536, show_default=True, type=click.IntRange(min=2),
              help="use at most this many tokens")
@click.option("--proto-steps", default=200, show_default=True, type=click.IntRange(min=0),
              help="Adam steps of the prototype fit (0: skip)")
@click.option("--routers", default="", help="also record the expert loads under these routers "
              "(comma-separated, default options; one more pass each), for --router NAME --plan rnq")
@click.option("--dtype", default=None, help="weights dtype (default: the checkpoint's)")
@quant_option
@click.option("--debug", is_flag=True, callback=_set_debug, is_eager=True, help="show tracebacks")
def calibrate(model, data, out, seq_len, batch, max_tokens, proto_steps, routers, dtype, quant, debug):
    """One pass over --data recording what routers need (LASER thresholds, expert loads and
    importance for R&Q, fitted prototypes); any command reads it with --calib. The file records
    the --quant it was measured under."""
    from .evaluation import read_tokens
    from .progress import bar
    from .routing.calibrate import calibrate as run_calibration, load_routers
    names = [r.strip() for r in routers.split(",") if r.strip()]
    passes = 1 + len(load_routers(names))  # a bad name fails before loading
    net, tok = _load(model, dtype, quant)
    tokens = read_tokens(tok, data)[:max_tokens]
    with bar(total=passes * max(1, tokens.numel() // seq_len), desc="calibrate", unit="window") as counter:
        calib = run_calibration(net, tokens, seq_len=seq_len, batch=batch, proto_steps=proto_steps,
                                progress=counter.update, routers=names)
    calib.meta["quant"] = net.quant.describe()
    calib.save(out)
    click.echo(f"wrote {out}: {len(calib.layers)} MoE layers, {calib.meta['tokens']} tokens", err=True)


@cli.command("eval")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="text file (perplexity, top-1 agreement) or .jsonl (question, choices, answer)")
@click.option("--window", default=128, show_default=True, type=int, help="tokens a perplexity window")
@click.option("--batch", default=8, show_default=True, type=int, help="windows a forward pass")
@click.option("--max-windows", default=None, type=int, help="score at most this many windows")
@click.option("--mc-prompt", default="Question: {question}\nAnswer:", show_default=True,
              help="how a multiple-choice question is written; each choice follows after a space "
                   "(the shipped cloze set wants '{question}')")
@click.option("--format", "fmt", type=click.Choice(["md", "json"]), default="md", show_default=True)
@engine_options
def eval_command(model, data, window, batch, max_windows, mc_prompt, fmt, engine):
    """Accuracy of --router on MODEL: perplexity and agreement with top-k, or multiple choice."""
    import json
    from .evaluation import evaluate
    options = dict(data=data, router=engine.router, plan=engine.plan, router_opts=engine.router_opts,
                   mc_prompt=mc_prompt, progress=True, window=window, batch=batch, max_windows=max_windows)
    if engine.ep > 1:  # every rank scores the same data over its share of the experts
        from .engine.parallel import run_spmd
        _load_checked(model, engine, weights=False)
        res = run_spmd(engine.ep, "tinymoe.evaluation:evaluate_ranked", dict(
            model=model, dtype=engine.dtype, quant=engine.quant, placement=engine.placement, calib=engine.calib,
            **options), _ep_threads())
    else:
        net, tok = _load_checked(model, engine)
        res = evaluate(net, tok, calib=engine.calib, **options)
    if fmt == "json":
        click.echo(json.dumps(res))
    else:
        click.echo("\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in res.items()))


@cli.command()
@click.argument("model", default="tiny")
@click.option("--batch", default="1,8,64", show_default=True, callback=_int_list, help="sequences decoding together")
@click.option("--prompt-len", default=64, show_default=True, type=int)
@click.option("--gen-len", default=32, show_default=True, type=int)
@click.option("--devices", default=4, show_default=True, type=int, help="G for I_dev and the modelled EP time")
@click.option("--data", default=None, type=click.Path(exists=True, dir_okay=False),
              help="text for prompts, perplexity and agreement (default: the embedded held-out text)")
@click.option("--sequences", default=16, show_default=True, type=int,
              help="score at least this many sequences per row (small batches run several rounds)")
@click.option("--format", "fmt", type=click.Choice(["md", "json", "csv"]), default="md", show_default=True)
@click.option("--plot", default=None, type=click.Path(dir_okay=False), callback=_output_file,
              help="write a load heatmap per router")
@engine_options
def bench(model, batch, prompt_len, gen_len, devices, data, sequences, fmt, plot, engine):
    """Speed, balance and accuracy of each --router (comma-separated; each under --plan if given)
    at each --batch, against top-k. Without --calib, calibrates on --data first."""
    from . import benchmark
    from .evaluation import read_tokens
    from .routing.calibrate import calibrate as run_calibration
    ctx = click.get_current_context()
    names = engine.router.split(",")
    if ctx.get_parameter_source("router") == click.core.ParameterSource.DEFAULT:
        names = ["topk", "laser", "bias"] if engine.plan else ["topk", "laser", "rnq", "bias"]
    per = benchmark.check_routers(names, engine.router_opts, engine.plan)
    net, tok = _load_checked(model, engine, check_router=False)
    data = data or _default_data(model)
    tokens = read_tokens(tok, data)
    calib = engine.calib
    if calib is None and (engine.plan or set(names) - {"topk", "balanced", "random", "bias"}):
        click.echo(f"calibrating on {data} (pass --calib FILE to use your own)", err=True)
        with _windows_bar(tokens[:32768], 128) as counter:
            # a plan over a router sizes its replicas for that router's loads: record them too
            loads = [(n, per[n]) for n in names if n != "topk"] if engine.plan else []
            calib = run_calibration(net, tokens[:32768], seq_len=128, progress=counter.update, routers=loads)
    args = dict(routers=names, batches=batch, tokens=tokens, prompt_len=prompt_len, gen_len=gen_len,
                devices=devices, calib=calib, router_opts=engine.router_opts, min_sequences=sequences,
                progress=True, plan=engine.plan)
    if engine.ep > 1:  # every rank runs the same bench over its share of the experts
        from .engine.parallel import run_spmd
        del net
        res = run_spmd(engine.ep, "tinymoe.benchmark:run_ranked", dict(
            model=model, dtype=engine.dtype, quant=engine.quant, placement=engine.placement, **args), _ep_threads())
    else:
        res = benchmark.run(net, **args)
    click.echo(benchmark.format_rows(res, fmt))
    if plot:
        benchmark.plot_heatmaps(res, plot)
        click.echo(f"wrote {plot}", err=True)


@cli.command()
@click.argument("model")
@click.option("--quant", required=True, metavar="SPEC", callback=_check_quant, help="what to quantise: " + QUANT_SPECS)
@click.option("--out", required=True, type=click.Path(), help="a new (or empty) directory to write")
@click.option("--debug", is_flag=True, callback=_set_debug, is_eager=True, help="show tracebacks")
def quantize(model, quant, out, debug):
    """Write MODEL quantised as --quant into --out: safetensors with int8/int4 codes and scales,
    the tokenizer, and config.json with its quantization_config. Every command loads it directly."""
    from .models.checkpoint_writer import write_quantized
    res = write_quantized(model, quant, out, progress=True)
    click.echo(f"wrote {res['dir']}: {res['quant'].describe()}, {res['tensors']} tensors, "
               f"{res['bytes'] / 2**20:.1f} MiB (source {res['source_bytes'] / 2**20:.1f} MiB)", err=True)


# --- serve (serving engineer) ---


@cli.command()
@click.argument("model", default="tiny")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="TINYMOE_API_KEY",
              help="require `Authorization: Bearer KEY` on /v1, /tokenize, /detokenize (env TINYMOE_API_KEY)")
@click.option("--max-num-seqs", default=64, show_default=True, type=click.IntRange(min=1),
              help="sequences decoding together")
@click.option("--max-waiting", default=128, show_default=True, type=click.IntRange(min=0),
              help="sequences queued beyond those; past it a request gets 503 with Retry-After")
@click.option("--kv-cache-tokens", default=None, type=click.IntRange(min=1),
              help="paged KV cache size in tokens (default: a 512 MiB budget)")
@click.option("--max-model-len", type=click.IntRange(min=2), default=None, help="context in tokens (default: the model's)")
@click.option("--expert-window", default=64, show_default=True, type=click.IntRange(min=0),
              help="forward passes behind the expert-load metrics (0: off, and routing stays native)")
@click.option("--devices", default=4, show_default=True, type=click.IntRange(min=1), help="G of the I_dev metric")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@engine_options
def serve(model, host, port, api_key, max_num_seqs, max_waiting, kv_cache_tokens, max_model_len, expert_window,
          devices, log_level, engine):
    """Serve MODEL (default: the embedded tiny model) over the OpenAI API: /v1/chat/completions,
    /v1/completions, /v1/models, /health, /metrics, /tokenize, /detokenize. Requests from all
    clients decode in one batch; SIGINT / SIGTERM finish the running requests and exit."""
    from .server import bind, serve as run_server
    sock = bind(host, port)  # a taken port fails before the model loads
    try:
        llm = engine.llm(model, max_num_seqs=max_num_seqs, max_batch_tokens=max(4096, max_num_seqs),
                         kv_cache_tokens=kv_cache_tokens, max_model_len=max_model_len)
        devices = engine.ep if engine.ep > 1 else devices  # I_dev over the ranks the experts are on
        run_server(llm, sock, model, api_key, max_waiting, expert_window, devices, log_level)
    finally:
        sock.close()
