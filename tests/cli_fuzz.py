"""The command line's fuzz cases, made from its own parser: every numeric option of every command
gets absurd values (negative, zero, huge, not finite) and every file argument hostile files
(truncated, empty, a folder, a text file, an image, the output over the input, an unwritable
place), so a flag added tomorrow is covered by construction. `run` executes them in one worker
process (one torch import), restarting it after the case that killed it, and reports each outcome:
the rule is exit 0, or exit 2 with one line `klvae: error: ...`; never a traceback, a crash or a hang.

    python tests/cli_fuzz.py CASES.json START   # the worker (tests/test_cli.py starts it)
"""
import argparse
import contextlib
import io
import json
import signal
import subprocess
import sys
from pathlib import Path

NUMBERS = {int: ["-3", "0", "100000", "10000000000000000000000"], float: ["-1", "0", "nan", "inf", "1e308"]}
CASE_SECONDS = 60


def valid_calls(d: Path) -> dict:
    """A working call of each command on the small files in `d` (vae.safetensors, img.png, z.safetensors)."""
    vae = ["--vae", str(d / "vae.safetensors")]
    return {
        "info": ["info", str(d / "vae.safetensors")],
        "encode": ["encode", str(d / "img.png"), "-o", str(d / "out_z.safetensors"), *vae],
        "decode": ["decode", str(d / "z.safetensors"), "-o", str(d / "out.png"), *vae],
        "roundtrip": ["roundtrip", str(d / "img.png"), "-o", str(d / "out_rt.png"), *vae],
        "convert": ["convert", str(d / "vae.safetensors"), "-o", str(d / "out_vae.safetensors"), "--layout", "ldm"],
        "demo": ["demo", "--size", "64", "--tile", "32", "--out", str(d / "demo"), *vae],
    }


def hostile_files(d: Path) -> dict:
    """Files no command should choke on, made in `d`."""
    good = (d / "vae.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(good[: len(good) // 3])
    (d / "empty.safetensors").write_bytes(b"")
    (d / "notes.md").write_text("# not a VAE\n")
    (d / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (d / "a_folder").mkdir(exist_ok=True)
    return {"truncated": d / "truncated.safetensors", "empty": d / "empty.safetensors", "markdown": d / "notes.md",
            "json": d / "config.json", "folder": d / "a_folder", "image": d / "img.png", "missing": d / "nope.safetensors"}


def cases(d: Path, parser: argparse.ArgumentParser) -> list:
    """[(label, argv)]: each command's valid call with one argument made absurd."""
    calls, files = valid_calls(d), hostile_files(d)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for value in NUMBERS[int]:  # the global option
        out.append((f"--threads {value}", ["--threads", value, *calls["info"]]))
    for name, p in sub.choices.items():
        base = calls[name]
        for a in p._actions:
            if not a.option_strings or a.type not in NUMBERS or a.choices:
                continue
            flag = a.option_strings[-1]
            for value in NUMBERS[a.type]:
                argv = list(base)
                if flag in argv:  # replace the valid call's own value
                    argv[argv.index(flag) + 1] = value
                else:
                    argv += [flag, value]
                out.append((f"{name} {flag} {value}", argv))
        positional = base[1]  # the file each command reads
        for kind, path in files.items():
            if Path(positional) != path:
                out.append((f"{name} <{kind}>", [name, str(path), *base[2:]] if name != "demo" else
                            base + ["--vae", str(path)]))
        if "-o" in base:
            i = base.index("-o") + 1
            for kind, target in (("unwritable", "/proc/klvae-fuzz" + Path(base[i]).suffix),
                                 ("inside a file", str(d / "img.png" / ("x" + Path(base[i]).suffix))),
                                 ("the input", base[1])):
                out.append((f"{name} -o <{kind}>", base[:i] + [target] + base[i + 1:]))
    return out


def run(d: Path, parser) -> list:
    """Every case in a worker process; a case that kills the worker is recorded and the next worker
    starts after it. Returns [(label, outcome dict)]."""
    todo = cases(d, parser)
    (d / "cases.json").write_text(json.dumps([argv for _, argv in todo]))
    results, start = {}, 0
    while start < len(todo):
        r = subprocess.run([sys.executable, __file__, str(d / "cases.json"), str(start)], capture_output=True,
                           text=True, timeout=CASE_SECONDS * (len(todo) - start) + 60)
        last = start
        for line in r.stdout.splitlines():
            if line.startswith("START "):
                last = int(line.split()[1])
            elif line.startswith("RESULT "):
                i, outcome = json.loads(line[7:])
                results[i] = outcome
        if len(results) == len(todo):
            break
        if last not in results:  # the worker died inside this case
            results[last] = {"rc": f"worker died (exit {r.returncode})", "stderr": r.stderr[-600:]}
        start = last + 1
    return [(label, results[i]) for i, (label, _) in enumerate(todo)]


def bad(outcome: dict) -> str | None:
    """Why an outcome breaks the rule, or None."""
    rc, err = outcome["rc"], outcome["stderr"]
    if rc not in (0, 2):
        return f"exit {rc} {outcome.get('exc', '')}"
    if "Traceback" in err:
        return "traceback"
    if rc == 2:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        if len(lines) != 1 or not lines[0].startswith("klvae: error: "):
            return f"{len(lines)} lines: {err[-300:]!r}"
    return None


def worker(cases_file: str, start: int) -> None:
    from klvae import cli

    def hang(*_):
        raise TimeoutError(f"no answer in {CASE_SECONDS} s")
    signal.signal(signal.SIGALRM, hang)
    argvs = json.loads(Path(cases_file).read_text())
    for i in range(start, len(argvs)):
        print(f"START {i}", flush=True)
        err = io.StringIO()
        signal.alarm(CASE_SECONDS)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                outcome = {"rc": cli.main(argvs[i])}
        except TimeoutError as e:
            outcome = {"rc": "hang", "exc": str(e)}
        except BaseException as e:  # SystemExit from --help-like paths included: recorded, judged by bad()
            outcome = {"rc": getattr(e, "code", "exception"), "exc": repr(e)[:300]}
        signal.alarm(0)
        outcome["stderr"] = err.getvalue()[-1000:]
        print("RESULT " + json.dumps([i, outcome]), flush=True)


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]))
