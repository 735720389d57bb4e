"""`chatforge`: run the pipeline or one stage, and inspect the artifact store.

Errors a user can fix (bad preset, unknown key, empty corpus, unwritable store...) print one line
`chatforge: error: ...` and exit 1 (2 for bad command-line usage); the store is left as it was.
Prefect and torch are imported only by the commands that need them, so `artifacts ls` is fast.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A first run creates the temporary server's database, which takes longer than Prefect's 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
LOCAL_SERVER = "http://127.0.0.1:4200/api"

STORE_HELP = "artifact store: a directory or fsspec URL (default: $CHATFORGE_HOME or ~/.cache/chatforge)"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="tiny (CPU, offline, minutes), d12, d20 (8×H100 speedrun), d26, d32 (default: tiny)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set tokenizer.vocab_size=8192 (repeatable; values are JSON or plain text)")
    p.add_argument("--store", default=None, help=STORE_HELP)


def _prices_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prices", metavar="FILE", default=None,
                   help="price file: TOML with a [prices] table of $ per device-hour, e.g. H100 = 2.49 (default: "
                   "$CHATFORGE_HOME/prices.toml when it exists); over the built-in prices, under --set cost.prices.X")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="chatforge",
        description="Train a small ChatGPT from scratch as a Prefect flow of cached, versioned artifacts.",
        epilog="Without PREFECT_API_URL, `run` and `stage` use a server on 127.0.0.1:4200 when one answers, else "
        "start a background Prefect server (127.0.0.1, this chatforge home's database) that later runs attach to and "
        "that stops after 30 min idle (`chatforge server --stop` now; CHATFORGE_BACKGROUND_SERVER=0: a temporary "
        "server per run instead). Set PREFECT_API_URL to use another server.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    run_help = ("run the pipeline; finished stages come from the store. Ends with a summary from the ledger: each stage "
                "(cached or computed, wall time, $), the scores, totals, the store and the commands to run next")
    run = sub.add_parser("run", help=run_help, description=run_help[0].upper() + run_help[1:] + ".")
    _config_args(run)
    _prices_arg(run)
    run.add_argument("--until", metavar="STAGE", help="stop after this stage (runs only what it needs; `--dry-run` lists the stages)")
    run.add_argument("--force", metavar="STAGE", action="append", default=[], help="recompute this stage even if cached (repeatable)")
    run.add_argument("--dry-run", action="store_true", help="print each stage's key and whether it is cached, run nothing")

    stage_help = ("run one stage, its inputs resolved from the store (e.g. to rerun a failed stage), or taken from given "
                  "artifacts (--input): e.g. mid from an imported base checkpoint")
    stage = sub.add_parser("stage", help=stage_help, description=stage_help[0].upper() + stage_help[1:] + ".",
                           epilog="e.g. `chatforge stage mid --input base=import/karpathy--nanochat-d32`, "
                           "`chatforge stage chat_eval_sft --input sft=KEY`: the stage's key, and the parents in its "
                           "manifest, then derive from the artifact given.")
    stage.add_argument("name", help="stage name (see `chatforge run --dry-run`)")
    _config_args(stage)
    _prices_arg(stage)
    stage.add_argument("--run", dest="run_id", help="reuse the config of this earlier run (its id from the ledger / Prefect)")
    stage.add_argument("--force", action="store_true", help="recompute even if cached")
    stage.add_argument("--input", dest="inputs", action="append", default=[], metavar="NAME=REF",
                       help="read input NAME (one of the stage's inputs, e.g. base for mid) from this artifact instead of "
                       "the one the config plans: a ref (import/NAME, base/latest), a key or unique key prefix, or "
                       "hf://org/repo[@rev] (pulled); it must be of the kind NAME's stage makes (repeatable)")

    from model.chat.conversation import CHAT_TEMPERATURE, CHAT_TOP_K

    chat = sub.add_parser("chat", help="chat with a checkpoint in the terminal (streaming)")
    chat.add_argument("--model", default=None, help="a ref (sft/latest, base/latest), a key, or hf://org/repo[@rev] "
                      "(default: the newest chat model in the store: rl, else sft, else mid, else base)")
    chat.add_argument("-p", "--prompt", help="ask one question, print the reply and exit")
    chat.add_argument("--temperature", type=float, default=CHAT_TEMPERATURE, help=f"0 = greedy (default {CHAT_TEMPERATURE})")
    chat.add_argument("--top-k", type=int, default=CHAT_TOP_K, help=f"sample from the k most likely tokens; 0 = off (default {CHAT_TOP_K})")
    chat.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    chat.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    chat.add_argument("--store", default=None, help=STORE_HELP)

    from serve.cli import add_arguments

    add_arguments(sub.add_parser("serve", help="serve a checkpoint: OpenAI-compatible /v1/chat/completions and a web chat page"))

    from dashboards import cli as dashboard

    dashboard.add_arguments(sub.add_parser("dashboard", help=dashboard.HELP, description=dashboard.HELP[0].upper() + dashboard.HELP[1:] + "."))

    srv_help = ("start a local Prefect server (UI), the chatforge-cpu and chatforge-gpu work pools, the deployments of "
                "deploy/prefect.yaml (defaults: --preset/--set) and one worker per pool; Ctrl-C stops it all")
    srv = sub.add_parser("server", help=srv_help, description=srv_help[0].upper() + srv_help[1:] + ".")
    _config_args(srv)
    _prices_arg(srv)
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only; "
                     "0.0.0.0 lets workers on other machines connect)")
    srv.add_argument("--port", type=int, default=4200, help="Prefect server port (default: 4200)")
    srv.add_argument("--crash-after", type=float, default=90, metavar="SECONDS",
                     help="mark a flow run Crashed (so it can be retried) when its heartbeats, sent every 30 s, stop "
                     "for this long: its worker or machine died (default: 90)")
    srv.add_argument("--workers", default="chatforge-cpu,chatforge-gpu", metavar="POOLS",
                     help="pools to start a local worker for, comma-separated, or none (default: both; "
                     "--workers chatforge-cpu when GPU machines run the chatforge-gpu workers)")
    srv.add_argument("--stop", action="store_true", help="stop the background Prefect server that `chatforge run` "
                     "started for this chatforge home, and exit")

    wrk_help = ("start a Prefect worker for a chatforge work pool on this machine, pointed at the server in "
                "PREFECT_API_URL (default http://127.0.0.1:4200/api) and a store this machine can write")
    wrk = sub.add_parser("worker", help=wrk_help, description=wrk_help[0].upper() + wrk_help[1:] + ".")
    wrk.add_argument("--pool", required=True, help="chatforge-gpu (training stages) or chatforge-cpu (everything else)")
    wrk.add_argument("--store", default=None, help="artifact store for runs whose `store` field is empty: the one the "
                     "other machines use (s3://..., a shared directory); default: $CHATFORGE_HOME or ~/.cache/chatforge")
    wrk.add_argument("--name", default=None, help="worker name shown in the UI (default: POOL@HOST-PID)")
    wrk.add_argument("--limit", type=int, default=None, help="at most this many flow runs at once (default: no limit)")

    rep_help = ("print a run's report card as markdown (nanochat's: environment, a section per stage with time, $, cache "
                "hit and key metrics, metrics by model, totals), from the ledger: also for a run that stopped early")
    rep = sub.add_parser("report", help=rep_help, description=rep_help[0].upper() + rep_help[1:] + ". `chatforge report > report.md` keeps it.")
    rep.add_argument("run_id", nargs="?", metavar="RUN_ID", help="the run (default: the newest run in the store)")
    rep.add_argument("--store", default=None, help=STORE_HELP)

    arts = sub.add_parser("artifacts", help="inspect and maintain the artifact store")
    asub = arts.add_subparsers(dest="acmd", required=True)
    store_opt = argparse.ArgumentParser(add_help=False)
    store_opt.add_argument("--store", default=None, help=STORE_HELP)
    asub.add_parser("ls", parents=[store_opt], help="list committed artifacts with their keys and refs")
    show_help = "describe an artifact: kind, refs, lineage, config, metrics, files, and its reports, tables and samples"
    show = asub.add_parser("show", parents=[store_opt], help=show_help, description=show_help[0].upper() + show_help[1:] + ".")
    show.add_argument("ref", help="a ref (tokenizer/latest), a key or a unique key prefix")
    fmt = show.add_mutually_exclusive_group()
    fmt.add_argument("--report", action="store_true", help="print only the artifact's markdown report(s) (eval tables, compression, decontamination)")
    fmt.add_argument("--json", action="store_true", help="print the raw manifest.json (kind, config, parents, files with sha256, metrics)")
    ver_help = ("check sizes and sha256 of every file; corrupt artifacts are moved aside so they get recomputed. Without "
                "REFS also lists the store files that cannot be read (torn ledger rows, run files, refs, evals), which "
                "`gc --quarantine` moves aside; exit 1 when anything is corrupt or unreadable")
    ver = asub.add_parser("verify", parents=[store_opt], help=ver_help, description=ver_help[0].upper() + ver_help[1:] + ".")
    ver.add_argument("refs", nargs="*", help="refs or keys (default: all)")
    gc_help = ("delete temporary data, trash and artifacts no ref reaches (kept while a ref or manifest is unreadable); "
               "list unreadable store files and the resumable work in progress (wip/<key>) of stages that failed or "
               "were stopped, with size and age: a rerun resumes from it, so it is kept unless --wip")
    gc = asub.add_parser("gc", parents=[store_opt], help=gc_help, description=gc_help[0].upper() + gc_help[1:] + ". "
                         "Nothing a running stage holds (its key locked) is touched.")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be deleted or moved")
    gc.add_argument("--keep-unreferenced", action="store_true", help="delete temporary data only")
    gc.add_argument("--wip", action="store_true", help="also delete the resumable work in progress of keys not committed "
                    "and not locked (a rerun of that stage then starts from step 0)")
    gc.add_argument("--quarantine", action="store_true", help="move unreadable store files (torn ledger rows, run files, "
                    "refs, manifests, evals; an artifact's file takes the artifact along) to quarantine/ in the store, "
                    "same relative paths, for inspection; an artifact moved there is recomputed by the next run")
    pull = asub.add_parser("pull", parents=[store_opt], help="download (hf://org/repo[@rev]) or check an artifact and verify every file")
    pull.add_argument("ref")
    push = asub.add_parser("push", parents=[store_opt], help="upload an artifact to the Hugging Face Hub (token from HF_TOKEN)")
    push.add_argument("ref", help="ref or key to push")
    push.add_argument("target", help="hf://org/repo[@revision]")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--format", choices=("store", "transformers"), default="store",
                      help="store: the artifact's files and manifest, for `chatforge artifacts pull` (default); "
                      "transformers: a checkpoint as the nanochat model `chatforge export` writes, for "
                      "AutoModelForCausalLM.from_pretrained('org/repo')")
    q = asub.add_parser("query", parents=[store_opt], help="run SQL on the DuckDB catalog (tables: runs, stage_runs, "
                        "artifacts, run_info, evals, skipped)")
    q.add_argument("sql")

    exp_help = ("write a checkpoint as a Hugging Face transformers `nanochat` model: config.json, model.safetensors, "
                "tokenizer, chat template, generation config and a model card from its lineage; "
                "AutoModelForCausalLM.from_pretrained(OUT_DIR) loads it with no remote code")
    export = sub.add_parser("export", parents=[store_opt], help=exp_help, description=exp_help[0].upper() + exp_help[1:] + ".")
    export.add_argument("ref", help="the checkpoint: a ref (sft/latest, base/latest), a key, or hf://org/repo[@rev]")
    export.add_argument("out_dir", help="the directory to write (must not exist, or be empty)")
    imp_help = ("read a transformers `nanochat` model (a directory, or hf://org/repo[@rev] from the Hub) into the store as a "
                "checkpoint with a content-derived key and ref import/NAME, for chat, serve, chat_eval and mid/sft/rl "
                "(`chatforge stage STAGE --input ...`); a model with features chatforge's GPT lacks is refused")
    imp = sub.add_parser("import", parents=[store_opt], help=imp_help, description=imp_help[0].upper() + imp_help[1:] + ".")
    imp.add_argument("source", help="a transformers model directory, or hf://org/repo[@revision]")
    imp.add_argument("--stage", choices=("base", "mid", "sft", "rl"), default=None,
                     help="which checkpoint it stands in for, deciding what trains from it (mid starts from base, sft "
                     "from mid, rl from sft); default: the stage a chatforge export recorded, else base")
    imp.add_argument("--name", default=None, help="the ref's name, import/NAME (default: the directory name, or org--repo)")

    cat = sub.add_parser("catalog", help="the DuckDB catalog of the store (runs, stage_runs, artifacts, run_info, evals, skipped)")
    csub = cat.add_subparsers(dest="ccmd", required=True)
    exp = csub.add_parser("export", parents=[store_opt], help="write every catalog table into a DuckDB file for other tools")
    exp.add_argument("file", help="the DuckDB file to write (replaced if it exists)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return {"run": cmd_run, "stage": cmd_stage, "artifacts": _lazy("store_cli", "cmd_artifacts"), "catalog": _lazy("store_cli", "cmd_catalog"), "server": cmd_server, "worker": cmd_worker, "chat": cmd_chat, "serve": cmd_serve, "dashboard": cmd_dashboard,
                "report": cmd_report, "export": _lazy("interop", "cmd_export"), "import": _lazy("interop", "cmd_import")}[args.cmd](args)
    except KeyboardInterrupt:
        print("chatforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - user-facing errors become one line; anything else keeps its traceback
        e = _config_validation(e)
        if _is_user_error(e):
            # a temporary server is stopped first, so that its "Stopping" line does not follow the error
            _quiet_prefect() if "prefect.server.api.server" in sys.modules else _drain_prefect()
            print(f"chatforge: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
            return 1
        raise


def _lazy(module: str, name: str):
    """The command `name` of flows/`module`.py, imported only when it runs (interop pulls in torch)."""
    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(f"flows.{module}"), name)(args)
    return run


def _drain_prefect() -> None:
    """Let Prefect flush its event/log queues now, so its exit-time chatter does not follow our error line."""
    if "prefect" not in sys.modules:
        return
    try:
        from prefect._internal.concurrency.services import QueueService

        QueueService.drain_all(timeout=10)
    except Exception:  # noqa: BLE001 - best effort; an internal API may move
        pass


def _config_validation(e: Exception) -> Exception:
    """A config that fails its schema outside `--set` (an earlier run's recorded config under `stage --run`) as the
    one-line ConfigError that `--set` gives; any other exception as it is."""
    from pydantic import ValidationError

    from model.config import Section

    if isinstance(e, ValidationError) and e.title in {c.__name__ for c in _subclasses(Section)}:
        from flows.overrides import ConfigError, one_line

        return ConfigError(one_line(e))
    return e


def _subclasses(cls) -> list[type]:
    return [cls] + [s for c in cls.__subclasses__() for s in _subclasses(c)]


class _UserErrorTraceback:
    """Console filter: leaves out a log record that carries the traceback of a user error (Prefect logs a failed task
    run and its flow run with one). Such an error is printed once, when the command ends, as `chatforge: error: ...`;
    the record still reaches Prefect's API log handler, so the run's logs in the Prefect UI keep the traceback (as
    does a log file, where a Prefect logging config adds one). CHATFORGE_DEBUG=1 shows them on the console too."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not isinstance(exc, Exception) or not _is_user_error(_config_validation(exc))


def _quiet_user_error_tracebacks() -> None:
    """Install _UserErrorTraceback on the console handlers Prefect's logging set up (call after importing Prefect)."""
    import logging

    if os.environ.get("CHATFORGE_DEBUG"):
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                and not any(isinstance(f, _UserErrorTraceback) for f in handler.filters):
            handler.addFilter(_UserErrorTraceback())


def _is_user_error(e: Exception) -> bool:
    from artifacts.errors import StoreError
    from flows.overrides import ConfigError
    from model.errors import InputError

    from artifacts.catalog import CatalogError
    from artifacts.prices import PriceFileError

    return isinstance(e, (StoreError, ConfigError, InputError, KeyError, CatalogError, PriceFileError)) and "\n" not in str(e)


def _prefect_api():
    """Choose the Prefect server of a run; returns a call that waits until it answers (a background server being
    started meanwhile, while this process imports Prefect). PREFECT_API_URL when set (even empty: a temporary
    server); else this home's background server (flows/background.py), else a server on 127.0.0.1:4200 if one
    answers, else a new background server, or a temporary one when CHATFORGE_BACKGROUND_SERVER=0."""
    if "PREFECT_API_URL" in os.environ:
        return lambda: None
    from flows import background

    st = background.state()
    if st is None:
        import socket

        try:
            socket.create_connection(("127.0.0.1", 4200), timeout=0.2).close()
        except OSError:
            pass
        else:
            os.environ["PREFECT_API_URL"] = LOCAL_SERVER
            print(f"chatforge: using the Prefect server at {LOCAL_SERVER}", file=sys.stderr)
            return lambda: None
        if not background.enabled():
            print(f"chatforge: no Prefect server at 127.0.0.1:4200 and {background.SWITCH}=0; starting a temporary one "
                  "for this run", file=sys.stderr)
            return lambda: None
        st, started = background.start()
    else:
        started = False
    os.environ["PREFECT_API_URL"] = st["url"]
    verb = "started a" if started else "using the"
    print(f"chatforge: {verb} background Prefect server at {st['ui']} (UI), {background.how_to_stop(st)}", file=sys.stderr)
    return lambda: background.wait(st, meanwhile=_imports_after_start)


def _imports_after_start() -> None:
    """What a run imports once its flow starts (Prefect's parameter encoder, the summary's catalog and report):
    imported while a background server starts, on the core the server leaves free, rather than after."""
    import fastapi.encoders  # noqa: F401

    import artifacts.catalog  # noqa: F401
    import artifacts.report  # noqa: F401
    import artifacts.summary  # noqa: F401


def _config(args):
    from flows.overrides import build_config

    return build_config(args.preset, args.sets)


def _check_stage(name: str) -> None:
    from tasks.registry import get

    get(name)  # raises a one-line KeyError naming the stages


def cmd_run(args) -> int:
    from artifacts.store import Store

    from flows.overrides import with_prices

    cfg = with_prices(_config(args), args.prices)
    for name in ([args.until] if args.until else []) + args.force:
        _check_stage(name)
    store = Store(args.store)
    if args.dry_run:
        return _dry_run(cfg, store, args.until)
    store.ensure_writable()
    ready = _prefect_api()
    from flows.pipeline import pipeline  # seconds of imports, while a background server starts

    ready()
    _quiet_user_error_tracebacks()
    t0 = time.perf_counter()
    state = pipeline(config=cfg, until=args.until, force=args.force, store=store.url, return_state=True)
    state.result()  # re-raises the error of a failed stage
    elapsed = time.perf_counter() - t0
    _quiet_prefect()
    print(_summary(store, str(state.state_details.flow_run_id), args, elapsed), end="", flush=True)
    return 0


def _summary(store, run_id: str, args, elapsed: float | None = None) -> str:
    from artifacts.summary import run_summary
    from flows.store_cli import missing_data_hints
    from tasks.registry import STAGES
    from tasks.stage import upstream

    ran = {s.name for s in upstream(STAGES, args.until)} if args.until else {s.name for s in STAGES}
    return run_summary(store, run_id, hints=missing_data_hints(), store_arg=args.store, until=args.until,
                       not_run=[s.name for s in STAGES if s.name not in ran], elapsed=elapsed)


def _quiet_prefect() -> None:
    """Flush Prefect's logs and stop a temporary server now, so that nothing Prefect says follows the summary."""
    _drain_prefect()
    if "prefect.server.api.server" not in sys.modules:  # no temporary server; importing it costs seconds
        sys.stderr.flush()
        return
    try:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
    except Exception:  # noqa: BLE001 - best effort; an internal API may move (then Prefect stops it at exit)
        pass
    sys.stderr.flush()


def _dry_run(cfg, store, until) -> int:
    from tasks.registry import STAGES
    from tasks.runner import lookup
    from tasks.stage import plan, upstream

    keys = plan(STAGES, cfg)
    for st in upstream(STAGES, until) if until else STAGES:
        state = "cached" if lookup(store, keys[st.name], log=lambda m: None) else "to compute"
        print(f"{st.name:<10} {keys[st.name]}  {state}")
    return 0


def cmd_stage(args) -> int:
    from artifacts import ledger
    from artifacts.store import Store
    from model.config import PipelineConfig
    from tasks import inputs
    from tasks.registry import get

    _check_stage(args.name)
    given = inputs.parse(args.inputs)
    inputs.check_names(get(args.name), given)  # before the config: a wrong name is the first thing to say
    store = Store(args.store)
    if args.run_id:
        try:
            cfg = PipelineConfig.model_validate(ledger.read_run(store, args.run_id)["config"])
        except FileNotFoundError:
            raise KeyError(f"no run {args.run_id!r} in {store.url}: see `chatforge artifacts query 'select * from runs'`") from None
        if not cfg.report.run_id:  # a run recorded before its config named its card: the card is of that run
            cfg.report.run_id = args.run_id
    else:
        cfg = _config(args)
    from flows.overrides import with_prices

    cfg = with_prices(cfg, args.prices)  # today's prices charge today's compute, also for an earlier run's config
    if args.name == "report" and not cfg.report.run_id:  # before any Prefect server starts
        from model.errors import InputError
        from tasks.report import MISSING_RUN

        raise InputError(MISSING_RUN)
    keys = inputs.resolve(get(args.name), given, store)  # reads the store only (an hf:// reference is pulled into it)
    for name, ref in given.items():
        print(f"chatforge: {args.name} reads {name} from {ref}" + ("" if keys[name] == ref else f" ({keys[name][:12]})"),
              file=sys.stderr)
    store.ensure_writable()
    ready = _prefect_api()
    from flows.pipeline import stage_flow

    ready()
    _quiet_user_error_tracebacks()
    key = stage_flow(stage=args.name, config=cfg, force=args.force, store=store.url, inputs=keys)
    print(f"{args.name:<10} {key}")
    return 0


def cmd_report(args) -> int:
    import shlex

    from artifacts import report
    from artifacts.catalog import open_catalog
    from artifacts.store import Store
    from tasks.registry import STAGES

    store = Store(args.store)
    catalog = open_catalog(store)  # cached and refreshed: a store of many runs is not re-read whole
    try:
        run_id = args.run_id or _newest_run(catalog.con, store, args.store)
        card = report.card(catalog.con, run_id, dag=[s.name for s in STAGES])
    except report.UnknownRun:
        opt = f" --store {shlex.quote(args.store)}" if args.store else ""
        raise KeyError(f"no run {run_id!r} in {store.url}: list the runs with `{report.QUERY_RUNS}{opt}`") from None
    finally:
        catalog.close()
    print(report.markdown(card), end="")
    return 0


def _newest_run(con, store, store_arg: str | None) -> str:
    """The run recorded last (its start record, else its first ledger row)."""
    row = con.execute("""SELECT run_id FROM (SELECT run_id, started FROM run_info UNION ALL SELECT run_id, started FROM runs)
                         ORDER BY started DESC NULLS LAST LIMIT 1""").fetchone()
    if row is None:
        raise KeyError(f"no run in {store.url} yet: `chatforge run{' --store ' + store_arg if store_arg else ''}` makes one")
    return row[0]


def cmd_dashboard(args) -> int:
    from dashboards.cli import cmd_dashboard as run

    return run(args)


def cmd_serve(args) -> int:
    from serve.cli import cmd_serve as run

    return run(args)


def cmd_chat(args) -> int:
    from artifacts.models import pick_model, resolve_model
    from artifacts.store import Store
    from serve.terminal import chat

    if not 0 <= args.temperature <= 2 or not 0 <= args.top_k <= 200 or not 1 <= args.max_tokens <= 4096:
        raise KeyError("chat: --temperature must be in 0..2, --top-k in 0..200, --max-tokens in 1..4096")
    store = Store(args.store)
    path = resolve_model(pick_model(args.model, store, log=lambda m: print(m, file=sys.stderr)), store)
    return chat(path, args.prompt, args.temperature, args.top_k or None, args.max_tokens, device=args.device)


def cmd_server(args) -> int:
    if args.stop:
        from flows.background import folder, stop

        st = stop()
        print(f"chatforge server: stopped the background Prefect server at {st['ui']} (pid {st['pid']})" if st else
              f"chatforge server: no background Prefect server is running for {folder()}", file=sys.stderr)
        return 0
    from flows.server import main as serve_main

    pools = [p.strip() for p in args.workers.split(",") if p.strip() and p.strip() != "none"]
    return serve_main(args.host, args.port, args.preset, args.sets, args.store, prices=args.prices, crash_after=args.crash_after, local_pools=pools)


def cmd_worker(args) -> int:
    from flows.worker import main as worker_main

    return worker_main(args.pool, args.store, name=args.name, limit=args.limit)


if __name__ == "__main__":
    sys.exit(main())
