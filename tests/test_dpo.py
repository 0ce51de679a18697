"""The consensus-DPO trainer on tiny-random: a 3-step run completes (3 metrics lines, finite loss, the LoRA moves), a run
stopped after its step-2 checkpoint and resumed ends bit-identical to an uninterrupted one (policy and reference adapter),
and the papermill entry point nbs/dpo.ipynb runs with its defaults."""
import json, math
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]


def make(out, steps, resume=False):
    from apex_nb.dpo import DPOTrainer, make_dpo_config
    return DPOTrainer(make_dpo_config('tiny-random', steps=steps, out_dir=str(out), resume=resume, save_every=1, eval_every=0,
                                      ref_update_every=2, seed=3))


def adapters(trainer):
    from apex_nb.dpo import adapter_params
    tr = trainer.pipe.transformer
    return {a: {n: p.detach().clone() for n, p in adapter_params(tr, a).items()} for a in ('default', 'ref')}


def test_three_steps(tmp_path):
    from apex_nb.runs import read_metrics
    t = make(tmp_path / 'run', 3)
    before = adapters(t)['default']
    t.train()
    steps = [r for r in read_metrics(tmp_path / 'run') if 'eval' not in r]
    assert [r['step'] for r in steps] == [0, 1, 2]
    assert all(math.isfinite(r['loss']) and r['pairs'] > 0 for r in steps)
    after = adapters(t)['default']
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert (tmp_path / 'run' / 'checkpoints' / 'step-000003' / 'pytorch_lora_weights.safetensors').exists()


def test_resume_matches_uninterrupted(tmp_path):
    from apex_nb.runs import read_metrics
    ref = make(tmp_path / 'ref', 3); ref.train()
    make(tmp_path / 'cut', 2).train()                         # stops after step 1; the reference was re-set at step 1
    resumed = make(tmp_path / 'cut', 3, resume=True)
    assert resumed.step == 2
    resumed.train()
    a, b = adapters(ref), adapters(resumed)
    for adapter in ('default', 'ref'):
        assert a[adapter].keys() == b[adapter].keys() and len(a[adapter]) > 0
        for n in a[adapter]: assert torch.equal(a[adapter][n], b[adapter][n]), (adapter, n)
    loss = lambda d: [r['loss'] for r in read_metrics(d) if 'eval' not in r]
    assert loss(tmp_path / 'cut') == loss(tmp_path / 'ref')   # every step once, the same numbers


def test_notebook_defaults(tmp_path):
    "dpo.ipynb as users run it (papermill, the live dashboard on): nbdev_test skips this entry point, it runs here."
    import papermill as pm
    out = tmp_path / 'out.ipynb'
    pm.execute_notebook(str(ROOT / 'nbs' / 'dpo.ipynb'), str(out), parameters=dict(out_dir=str(tmp_path / 'run'), steps=2),
                        kernel_name='python3', cwd=str(tmp_path), progress_bar=False)
    nb = json.loads(out.read_text())
    figures = [o for c in nb['cells'] for o in c.get('outputs', []) if 'application/vnd.plotly.v1+json' in o.get('data', {})]
    assert len(figures) >= 6
    cfg = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert (cfg['labeler'], cfg['steps'], cfg['model'], cfg['prompts']) == ('majority', 2, 'apex-tiny', 'apex-tiny-signs')
