"""README.md's commands work: every command of its ```sh blocks runs here on tiny artefacts, or is listed
with the reason it cannot (hub models, GPUs, several processes or machines, real scale) and checked cheaply.

TABLE holds one Entry per kind of README command, matched by a regex (re.match) on the command as the
README writes it (continuation lines joined, the trailing `# comment` dropped). Every README command must
match exactly one entry, and every entry at least one command: a new README line fails here, with its text,
until it gets an entry; an entry whose line left the README fails as stale.

A command that runs (no `skip`) runs in a workspace whose files carry the names the README uses (RUN_DIR,
a.png, CONFIG.yaml, data/shapes, runs/demo/stage2, vqav2/, ...; tests/readme_runner.py builds it with tiny
trained runs), with its optional `[...]` groups filled in, the entry's `subs` applied and `extra` (small
overrides such as max_steps=1) appended; it must exit 0 and leave the entry's `creates` behind. A skipped
command gets `make -n`, `train.py --check`, or `--help` (which must name every flag it uses) plus a parse
of its own arguments, so a wrong module, script, flag or config key fails. Commands run in README order
(the CLIP export uses the run trained by the line before it).

Adding a README command: add an Entry next to its neighbours; give any new file it names to
`build_workspace` in tests/readme_runner.py.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.readme_commands import README, Worker, expand_optional, readme_commands
from tests.tiny_server import free_port


@dataclass(frozen=True)
class Entry:
    pattern: str  # re.match on the README command
    skip: str = ""  # why it cannot run here; empty: it runs
    extra: str = ""  # appended arguments: small overrides, or data paths for a skipped recipe's --check
    subs: tuple[tuple[str, str], ...] = ()  # (regex, replacement) on the command, before `extra`
    stdin: str | None = None  # what an interactive command reads
    creates: tuple[str, ...] = ()  # workspace paths it must leave; {--flag} is that flag's value
    prints: str = ""  # a regex its output must match
    serve: bool = False  # a server: started on a free port, then `probe` must answer
    probe: tuple[str, str] = ("/health", "ok")  # (path, regex of the body) for a server
    hidden: tuple[str, ...] = ()  # options absent from --help on purpose (still checked by parsing)
    help_prefix: tuple[str, ...] = ()  # arguments before --help (a subcommand)
    check: Callable[[list[str]], list[str]] | None = None  # a program of someone else's: README -> problems
    needs: tuple[str, ...] = ()  # optional packages (extras) it needs: without them the test skips


HUB = "downloads hub models"
# A recipe's own data is not here: its --check reads the tiny shapes data instead.
DATA = "data_path=[data/shapes/train.jsonl] image_folder=data/shapes output_dir=runs/check"
PROCS = "starts {} training processes; tests/test_ddp.py and tests/test_engines_run.py run DDP, ZeRO and FSDP " \
        "with 2 CPU processes"
SHORT = "--max-new-tokens 4"
SERVE = ("fastapi", "uvicorn")


def _vllm_serves_our_export(commands: list[str]) -> list[str]:
    """vllm serves the directory that the README's llava-hf export writes."""
    ok = any(re.search(r"model\.export .*--dst runs/demo_clip_llava .*--format llava-hf", c) for c in commands)
    return [] if ok else ["no README command exports runs/demo_clip_llava (--format llava-hf) for vllm to serve"]


def _bigbro_train_flags_known(commands: list[str]) -> list[str]:
    """Every flag of the README's BigBro train.py line is one train.py translates (tests/test_bigbro.py runs
    such a line on tiny models; this one needs the hub's Qwen-7B-Chat and SigLIP)."""
    from qwenvl_lab.dataprocess import bigbro

    known = {*bigbro.TRAIN_ALIASES, *bigbro.SAME_KEYS, *bigbro.IGNORED, *bigbro.BOOL_FLAGS,
             "image_map", "captions_file", "base_language_model", "base_value_model", "report_to"}
    line = next(c for c in commands if c.startswith("python train.py --lora_rank "))
    return [f"train.py does not know the BigBro flag {a}" for a in shlex.split(line)
            if a.startswith("--") and a[2:] not in known]


TABLE = [
    # Quickstart
    Entry(r"make demo$", skip="the demo itself: ~5 min of CPU, CI runs it as its own job"),
    Entry(r"make test$", skip="the whole test suite, this file included"),
    # Train and ask
    Entry(r"sh train\.sh$", extra="max_steps=1 output_dir=runs/readme_stage2",
          creates=("runs/readme_stage2/final",)),
    Entry(r"sh train\.sh configs/(qwen7b_siglip_lora|qwen2\.5_0\.5b_siglip)\.yaml", skip=HUB, extra=DATA),
    Entry(r"python train\.py CONFIG\.yaml", creates=("runs/config_yaml/final",)),
    Entry(r"NPROC=2 sh train\.sh ", skip=PROCS.format(2)),
    Entry(r"sh test\.sh$", prints=r"answer: "),
    Entry(r"python test\.py --model \S+ --image .* --prompt ", extra=SHORT),
    Entry(r"python test\.py --model RUN_DIR --image a\.jpg$", extra=SHORT, prints=r"image\(s\) loaded",
          stdin="What colour is the shape?\n/image b.jpg\nAnd this one?\n\n"),
    Entry(r"python test\.py --model RUN_DIR --input ", extra=SHORT, creates=("{--output}",)),
    Entry(r"python test\.py \.\.\. ", extra=SHORT,
          subs=((r"\.\.\.", "--model RUN_DIR --image a.png --prompt 'What colour is the shape?'"),)),
    Entry(r"python -m qwenvl_lab.serve --model ", serve=True, probe=("/v1/models", r'"id": ?"stage2"'), needs=SERVE),
    Entry(r"python -m qwenvl_lab.serve\.web --model ", serve=True, probe=("/", r"(?i)gradio"), needs=(*SERVE, "gradio")),
    Entry(r"python test\.py --base_language_model ", skip=HUB + " (the original Qwen-7B-Chat + SigLIP pair)",
          hidden=("--base_language_model", "--base_value_model", "--model_weights", "--image_path")),
    Entry(r"python test\.py --lm ", skip=HUB + " (the original pair, a BigBro checkpoint)"),
    Entry(r"python train\.py --lora_rank ", skip=HUB + " (the original pair, a BigBro checkpoint)",
          check=_bigbro_train_flags_known),
    Entry(r"python -m qwenvl_lab.trainer\.evaluate ", prints=r"question type +correct"),
    # Evaluate
    Entry(r"python -m qwenvl_lab.evaluation --list-tasks", prints=r"vqav2"),
    Entry(r"python -m qwenvl_lab.evaluation --model ", extra="--max-new-tokens 4", creates=("{--output}/results.json",)),
    Entry(r"python -m qwenvl_lab.evaluation\.to_vqav2 ", creates=("{--out}/annotations.json",)),
    Entry(r"python -m qwenvl_lab.evaluation\.lmms_eval ", help_prefix=("eval",), needs=("lmms_eval",),
          skip="lmms-eval's tasks read their data sets from the hub; tests/test_evaluation_lmms.py runs the "
               "launcher offline on local tasks"),
    # Serve
    Entry(r"python -c \"from openai import OpenAI", prints=r"\n", needs=("openai",)),
    Entry(r"vllm serve ", skip="vLLM is not a dependency and serves on a GPU", check=_vllm_serves_our_export),
    # Many GPUs, long runs
    Entry(r"NNODES=2 ", skip="several machines"),
    Entry(r"NPROC=8 sh train\.sh CONFIG (deepspeed|fsdp)=", skip=PROCS.format(8)),
    Entry(r"sh train\.sh CONFIG resume_from_checkpoint=auto$", creates=("runs/config/final",)),
    # Which GPUs: the plan
    Entry(r"python -m qwenvl_lab.model\.plan ", prints=r"step time"),
    Entry(r"make demo-resolution$", skip="a demo: two tiny trainings, minutes of CPU (docs/benchmarks.md)"),
    Entry(r"make demo-dpo$", skip="a demo: a short SFT run and stage dpo, minutes of CPU (docs/benchmarks.md)"),
    # Images at their own resolution: the demo recipe with anyres / native keys, one step each
    Entry(r"sh train\.sh configs/demo/stage1\.yaml ", extra="max_steps=1 output_dir=runs/readme_resolution",
          creates=("runs/readme_resolution/final",)),
    Entry(r"make smoke-real$", skip="real shapes: ~12 GB of RAM and minutes of CPU (docs/scale.md)"),
    Entry(r"python -m qwenvl_lab.kernels\.selftest ", skip="needs a CUDA GPU"),
    # Swap a backbone: the hub recipes above. The model in code: an exportable tiny model.
    Entry(r"python -c \"from transformers import CLIPVisionConfig", creates=("runs/tiny_clip/config.json",)),
    Entry(r"python train\.py configs/demo/stage1\.yaml 'model\.towers=", extra="max_steps=1",
          creates=("{output_dir}/final",)),
    Entry(r"python -m qwenvl_lab.model\.export ", creates=("{--dst}/config.json",)),
    Entry(r"cd /tmp && CHECKOUT/\.venv/bin/python -c \"from qwenvl_lab\.model import VLM", prints=r"\w",
          subs=((r"cd /tmp && CHECKOUT/\.venv/bin/python", "python"), (r"CHECKOUT/", ""))),
    # Data converters
    Entry(r"python -m qwenvl_lab.dataprocess\.(coco_captions|llava_instruct|ai_challenger|image_map) ",
          creates=("{output}",)),
    Entry(r"python -m qwenvl_lab.dataprocess\.process_image ", extra="--workers 1", creates=("cache/coco336",)),
    Entry(r"python -m qwenvl_lab.dataprocess\.make_shapes ", subs=((r"data/shapes\b", "data/shapes_new"),),
          extra="--n-train 8 --n-val 2", creates=("data/shapes_new/train.jsonl",)),
    Entry(r"python -m qwenvl_lab.dataprocess\.make_vocab ", subs=((r"data/shapes\b", "data/shapes_new"),),
          extra="--merges 20",
          creates=("data/shapes_new/vocab",)),
]

# ------------------------------------------------------------------------------------------- matching

COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def match_table(commands: list[str], table: list[Entry]) -> tuple[dict[str, Entry], list[str]]:
    """Each command's entry, and the problems: commands with no or several entries, entries with none."""
    found, problems, used = {}, [], set()
    for cmd in commands:
        hits = [i for i, e in enumerate(table) if re.match(e.pattern, cmd)]
        used.update(hits)
        if len(hits) == 1:
            found[cmd] = table[hits[0]]
        elif not hits:
            problems.append(f"README command without an entry in tests/test_readme.py TABLE: {cmd}")
        else:
            problems.append(f"README command matched by {len(hits)} entries "
                            f"({', '.join(table[i].pattern for i in hits)}): {cmd}")
    problems += [f"stale TABLE entry (no README command matches it): {e.pattern}"
                 for i, e in enumerate(table) if i not in used]
    return found, problems


FOUND, PROBLEMS = match_table(COMMANDS, TABLE)


def _value(words: list[str], key: str) -> str:
    """The value of `--flag` (next word), `key=` (a key=value word) or `output` (the second positional)."""
    if key == "output":
        return [w for w in words[3:] if not w.startswith("-")][1]
    if key.startswith("-"):
        return words[words.index(key) + 1]
    return next(w.split("=", 1)[1] for w in words if w.startswith(key + "="))


PORTS: dict[str, int] = {}  # port a README command names -> the free port its server got here


def prepare(cmd: str, entry: Entry) -> str:
    """The command as it runs here: optional groups in, substitutions, ports, extra arguments."""
    text = expand_optional(cmd)
    for pattern, replacement in entry.subs:
        text = re.sub(pattern, replacement, text)
    if entry.serve:
        port = free_port()
        named = re.search(r"--port (\d+)", text)
        if named:
            PORTS[named.group(1)] = port
            text = text.replace(named.group(0), f"--port {port}")
        else:
            text += f" --port {port}"
    text = re.sub(r"(127\.0\.0\.1|localhost):(\d+)", lambda m: f"{m[1]}:{PORTS.get(m[2], m[2])}", text)
    return f"{text} {entry.extra}".strip()


# ---------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    w = Worker(root)
    try:
        answer = w.request(op="setup", root=str(root / "ws"))
        assert "seconds" in answer and not answer.get("problems"), answer.get("err")
        w.ws = root / "ws"
        yield w
    finally:
        w.close()


def test_every_readme_command_has_exactly_one_entry():
    assert len(COMMANDS) > 40 and "make demo" in COMMANDS  # the blocks were found (indented ones too)
    assert not PROBLEMS, "\n".join(PROBLEMS)


def test_matching_reports_new_and_stale_lines():
    extra = COMMANDS + ["python -m qwenvl_lab.model.quantize --src RUN_DIR"]
    _, problems = match_table(extra, TABLE)
    assert problems == ["README command without an entry in tests/test_readme.py TABLE: "
                        "python -m qwenvl_lab.model.quantize --src RUN_DIR"]
    _, problems = match_table([c for c in COMMANDS if not c.startswith("vllm ")], TABLE)
    assert problems == ["stale TABLE entry (no README command matches it): vllm serve "]


def _run(worker, ran: str, entry: Entry) -> dict:
    """Run (or, for a skipped entry, check) the prepared command `ran`."""
    if entry.check:
        return {"rc": 0, "out": "", "err": "", "problems": entry.check(COMMANDS)}
    if entry.skip:
        return worker.request(op="check", cmd=ran, hidden=list(entry.hidden), help_prefix=list(entry.help_prefix))
    return worker.request(op="run", cmd=ran, stdin=entry.stdin, serve=entry.serve)


def _skip_without(entry: Entry) -> None:
    missing = [m for m in entry.needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {missing} (an optional extra; make setup installs them)")


def _probe(cmd: str, entry: Entry) -> None:
    port = re.search(r"--port (\d+)", cmd).group(1)
    path, pattern = entry.probe
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as r:
        body = r.read().decode("utf-8", "replace")
    assert re.search(pattern, body), f"GET {path}: {body[:300]}"


@pytest.mark.slow  # one worker for the module: ~35 s of CPU in all (imports, a tiny training run, the commands)
@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{i:02d}-" + re.sub(r"[^\w.=/-]+", "_", c[:48])
                                              for i, c in enumerate(COMMANDS)])
def test_readme_command(worker, cmd):
    entry = FOUND.get(cmd)
    assert entry, f"no single TABLE entry for: {cmd}"
    _skip_without(entry)
    ran = cmd if entry.check else prepare(cmd, entry)
    answer = _run(worker, ran, entry)
    output = answer["out"] + answer["err"]
    what = f"{'checked' if entry.skip else 'ran'}: {ran}\n--- output ---\n{output[-3000:]}"
    assert answer["rc"] == 0 and not answer.get("problems"), f"{answer.get('problems')} {what}"
    if entry.serve:
        _probe(ran, entry)
    if entry.prints:
        assert re.search(entry.prints, output), f"output does not match {entry.prints!r}; {what}"
    words = shlex.split(ran)
    for path in entry.creates:
        path = re.sub(r"\{([^}]+)\}", lambda m: _value(words, m.group(1)), path)
        assert (worker.ws / path).exists(), f"{path} was not written; {what}"


# A mistake planted in a real README command (regex of the command, text, its wrong replacement) must fail.
PLANTED = [
    (r"python -m qwenvl_lab.evaluation\.to_vqav2 ", "--image-folder", "--image-dir"),  # runs here: argparse refuses it
    (r"python -m qwenvl_lab.kernels\.selftest ", "--device", "--devices"),  # skipped: not in --help, does not parse
    (r"python -m qwenvl_lab.evaluation\.lmms_eval ", "--batch_size", "--batchsize"),  # skipped: lmms-eval's own parser
    (r"python test\.py --base_language_model ", "--model_weights", "--model_weigths"),  # hidden from --help
    (r"sh train\.sh configs/qwen2\.5_0\.5b_siglip\.yaml lora", "lora.r=", "lora.rank="),  # train.py --check
    (r"NPROC=2 sh train\.sh configs/", "global_batch_size=", "global_batch="),  # --check under train.sh
    (r"make smoke-real$", "smoke-real", "smoke_real"),  # no such Makefile target
]


@pytest.mark.slow
@pytest.mark.parametrize("pattern, old, new", PLANTED, ids=[p[2] for p in PLANTED])
def test_a_planted_mistake_fails(worker, pattern, old, new):
    cmd = next(c for c in COMMANDS if re.match(pattern, c))
    bad = cmd.replace(old, new, 1)
    assert bad != cmd
    entry = FOUND[cmd]
    _skip_without(entry)
    answer = _run(worker, prepare(bad, entry), entry)
    assert answer["rc"] != 0 or answer.get("problems"), f"{bad} passed:\n{answer['out'][-2000:]}{answer['err']}"
