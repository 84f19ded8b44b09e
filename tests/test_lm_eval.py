"""The lm-evaluation-harness adapter, run offline on a local task (skipped without lm-eval)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (requirements-eval.txt)")

from deepseek_moe.data.tokenizer import eos_id  # noqa: E402
from deepseek_moe.generate import generate  # noqa: E402
from deepseek_moe.multiple_choice import (evaluate_multiple_choice, load_task_file,  # noqa: E402
                                          score_continuations)
from deepseek_moe.runs import load_checkpoint  # noqa: E402

ROWS = [
    {"context": "def main(", "choices": ["):", " the", "]]"], "label": 0},
    {"context": "The quick brown", "choices": ["fox", "(self,", "1 2 3"], "label": 0},
    {"context": "import", "choices": ["os", "and", "."], "label": 0},
    {"context": "for i in", "choices": ["range(10):", "the", "}"], "label": 0},
    {"context": "The expression", "choices": ["is evaluated", "))", "#"], "label": 0},
    {"context": "class", "choices": ["Foo:", "of", "+"], "label": 2},
]


class _Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def local_task(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lmeval_task")
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "dsmoe_local_mc.yaml").write_text(f"""task: dsmoe_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return d


def test_lm_eval_command_offline_matches_our_scoring(run, local_task, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"), HF_HOME=str(tmp_path / "hf"))
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "deepseek_moe", "lm-eval", "--model", "deepseek_moe",
           "--model_args", f"pretrained={run}", "--tasks", "dsmoe_local_mc",
           "--include_path", str(local_task), "--output_path", str(out), "--batch_size", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(out.rglob("results_*.json"))
    assert files, f"no results under {out}: {r.stdout[-2000:]}"
    res = json.loads(files[-1].read_text())["results"]["dsmoe_local_mc"]
    model, tok, _, _ = load_checkpoint(run)
    _, examples = load_task_file(local_task / "data.jsonl")
    ours = evaluate_multiple_choice(model, examples, tok, progress=False)
    assert res["acc,none"] == pytest.approx(ours.acc)
    assert res["acc_norm,none"] == pytest.approx(ours.acc_norm)


def test_adapter_methods_equal_direct_computation(run):
    from deepseek_moe.lm_eval_adapter import DeepseekMoELM

    lm = DeepseekMoELM(pretrained=str(run), batch_size="auto", max_length=32)
    model, tok = lm.model, lm.tokenizer
    eot = eos_id(tok)
    # loglikelihood: context / continuation split as lm-eval does, scored by score_continuations
    (lp, greedy), = lm.loglikelihood([_Req("def main(", "):")])
    ctx = tok.encode("def main(", add_special_tokens=False).ids
    cont = tok.encode("def main():", add_special_tokens=False).ids[len(ctx):]
    assert lp == pytest.approx(score_continuations(model, [(ctx, cont)])[0][0], abs=1e-5)
    # rolling: a text longer than max_length (32) is scored in disjoint windows, each token once
    text = "The quick brown fox jumps over the lazy dog. " * 6
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > 32
    (rolling,) = lm.loglikelihood_rolling([_Req(text)])
    expect, pos = 0.0, 0
    while pos < len(ids):  # window 1: [eot] + ids[:31] predicts ids[:32]; then from the previous token
        n = min(32, len(ids) - pos)
        context = [eot] if pos == 0 else ids[max(0, pos + n - 33):pos]
        expect += score_continuations(model, [(context, ids[pos:pos + n])], max_len=32)[0][0]
        pos += n
    assert rolling == pytest.approx(expect, abs=1e-3)
    # generate_until: greedy, cut at the stop string
    prompt = "def main("
    full = generate(model, [tok.encode(prompt, add_special_tokens=False).ids], 8, greedy=True,
                    stop_tokens=[eot])[0]
    text_full = tok.decode([t for t in full if t != eot])
    (got,) = lm.generate_until([_Req(prompt, {"until": ["\n\n\n\n"], "max_gen_toks": 8})])
    assert got == text_full.split("\n\n\n\n")[0]
    if len(text_full) > 2:
        stop = text_full[1:3]
        (cut,) = lm.generate_until([_Req(prompt, {"until": [stop], "max_gen_toks": 8})])
        assert cut == text_full[: text_full.index(stop)]
