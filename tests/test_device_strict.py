"""Device-strict tests (issue 14, item 3). On a CPU-only machine `apex_nb.devicecheck.pretend_cuda()` gives the code one
CUDA device; a CPU tensor meeting a CUDA tensor then fails as it would on a GPU. First the harness itself, then a full
GRPO step on the pretend GPU for each path that moves tensors between devices: the P³ scheduler with gradient-conflict
diagnostics (contributions C meet the device log-probs), the torchjd aggregator (per-objective Jacobian J, gradients
assigned to the parameters), and both together."""
import math
import pytest
import torch
from apex_nb.devicecheck import DeviceMixError, is_pretend, pretend_cuda, to_pretend_cuda

MIX = "Expected all tensors to be on the same device"


def test_refuses_cuda_meeting_cpu():
    with pretend_cuda():
        x, cpu = torch.randn(4, device='cuda'), torch.ones(4)
        for f in (lambda: x + cpu,                                   # TensorIterator op
                  lambda: torch.ones(2, 4) @ x,                      # generated check (mv)
                  lambda: torch.cat([x, cpu]),                       # a list argument
                  lambda: torch.zeros(2, 4).add_(x),                 # CPU accumulator, device term (the Jacobian bug)
                  lambda: x.index_select(0, torch.tensor([0, 1])),   # index_select wants its index on the device
                  lambda: torch.nn.functional.linear(x, torch.ones(3, 4))):
            with pytest.raises(DeviceMixError, match=MIX): f()
        with pytest.raises(DeviceMixError, match=r"got mat2 is on cpu, different from other tensors on cuda:0 \(when checking argument in method wrapper_CUDA_mm\)"):
            torch.ones(2, 4, device='cuda') @ torch.ones(4, 2)
        with pytest.raises(DeviceMixError, match="found at least two devices, cuda:0 and cpu!"): x * cpu
        with pytest.raises(DeviceMixError, match="indices should be either on cpu or on the same device"): cpu[torch.tensor([0]).cuda()]


def test_catches_the_trainer_bug_patterns():
    "The two device bugs of issue 14 in miniature: each would pass on a CPU and fails here, as on a GPU."
    with pretend_cuda():
        logp, C = torch.randn(8, device='cuda', requires_grad=True), torch.randn(8, 3)
        with pytest.raises(DeviceMixError, match=MIX): C.T @ logp                        # (1) CPU contributions x device log-probs
        cos = torch.eye(3, device='cuda')
        with pytest.raises(DeviceMixError, match=MIX): (-cos).clamp_min(0) * ~torch.eye(3, dtype=torch.bool)   # (1) device cos x CPU mask
        jac, p = torch.randn(3, 5, device='cuda'), torch.nn.Parameter(torch.zeros(5, device='cuda'))
        J = torch.zeros(3, 5)
        with pytest.raises(DeviceMixError, match=MIX): J += jac                          # (2) CPU Jacobian += device Jacobian
        with pytest.raises(DeviceMixError, match="gradient with device type 'cpu' to a tensor with device type 'cuda'"):
            p.grad = J.sum(0)                                                            # (2) CPU gradients into device parameters
        J = torch.zeros(3, 5, device=p.device); J += jac; p.grad = J.sum(0)              # the fixed forms pass
        assert is_pretend(p.grad) and is_pretend(torch.as_tensor(C, device=logp.device).T @ logp)


def test_allows_what_cuda_allows():
    with pretend_cuda():
        x = torch.randn(4, device='cuda')
        for y in (x + torch.tensor(2.), x * torch.tensor(3, dtype=torch.int64), torch.where(x > 0, x, torch.tensor(0.)),
                  x + 1.5, x[torch.tensor([0, 2])], x[torch.tensor([True, False, True, False])]):   # CPU scalars, Python scalars, CPU indices
            assert is_pretend(y) and y.device == torch.device('cuda', 0)
        z = x.clone(); z[:2] = torch.zeros(2)          # a copy across devices
        assert torch.equal(z.cpu()[:2], torch.zeros(2))
        assert isinstance(x.sum().item(), float) and x.tolist() == x.cpu().tolist()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
def test_to_round_trips_keep_exact_values(dtype):
    c = (torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)
    with pretend_cuda():
        for gpu in (c.to('cuda'), c.cuda(), c.to(torch.device('cuda', 0)), c.to(device='cuda:0'), torch.as_tensor(c, device='cuda')):
            assert is_pretend(gpu) and gpu.dtype == dtype
            back = gpu.to('cpu')
            assert type(back) is torch.Tensor and back.dtype == dtype and torch.equal(back, c)
            assert torch.equal(gpu.cpu(), c) and gpu.data_ptr() != c.data_ptr()        # a copy, not an alias
        assert torch.equal(torch.tensor(c.tolist(), dtype=dtype, device='cuda').cpu(), c)


def _fit(device, steps=4):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Dropout(0.0),
                            torch.nn.Linear(16, 3)).to(device)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g).to(device), torch.randn(32, 3, generator=g).to(device)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(m(x), y)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5); opt.step()
        losses.append(loss.item())
    return losses, m, opt


def test_module_trains_on_pretend_gpu_bit_equal_to_cpu():
    ref_losses, ref, _ = _fit('cpu')
    with pretend_cuda():
        losses, m, opt = _fit('cuda')
        assert all(is_pretend(p) and is_pretend(p.grad) for p in m.parameters())
        assert all(is_pretend(v) for s in opt.state.values() for k, v in s.items() if k != 'step')
        assert all(a.device == torch.device('cuda', 0) for a in m.state_dict().values())
        weights = {k: v.cpu() for k, v in m.state_dict().items()}
    assert losses == ref_losses                                          # forward, backward, clip and AdamW: bit for bit
    for k, v in ref.state_dict().items(): assert torch.equal(weights[k], v), k


def test_cuda_checks_on_grad_generator_numpy_and_devices():
    with pretend_cuda():
        lin = to_pretend_cuda(torch.nn.Linear(3, 2))
        with pytest.raises(DeviceMixError, match="assign a gradient with device type 'cpu' to a tensor with device type 'cuda'"):
            lin.weight.grad = torch.zeros(2, 3)
        lin.weight.grad = torch.zeros(2, 3, device='cuda')
        gen = torch.Generator('cuda').manual_seed(0)
        assert gen.device == torch.device('cuda', 0) and isinstance(gen, torch.Generator)
        assert is_pretend(torch.randn(3, generator=gen, device='cuda'))
        with pytest.raises(DeviceMixError, match="Expected a 'cuda' device type for generator but found 'cpu'"):
            torch.randn(3, generator=torch.Generator().manual_seed(0), device='cuda')
        with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"): lin.weight.detach().numpy()
        with pytest.raises(RuntimeError, match="invalid device ordinal"): torch.zeros(1, device='cuda:1')
        torch.manual_seed(5); a = torch.randn(4, device='cuda')          # torch.manual_seed seeds the pretend CUDA stream ...
        torch.manual_seed(5); b = torch.randn(4, device='cuda')
        assert torch.equal(a.cpu(), b.cpu())
        torch.manual_seed(5); torch.randn(4, device='cuda')
        assert torch.equal(torch.randn(4), (torch.manual_seed(5), torch.randn(4))[1])   # ... which is not the CPU stream


def test_patches_undone_even_on_error():
    import accelerate
    real = torch.cuda.is_available, torch.cuda.device_count, torch.Generator, torch.accelerator.is_available
    with pytest.raises(ZeroDivisionError):
        with pretend_cuda():
            assert torch.cuda.is_available() and torch.cuda.device_count() == 1
            assert accelerate.Accelerator().device.type == 'cuda'
            1 / 0
    assert (torch.cuda.is_available, torch.cuda.device_count, torch.Generator, torch.accelerator.is_available) == real
    assert not torch.cuda.is_available()
    with pytest.raises(AssertionError, match='not compiled with CUDA'): torch.zeros(1, device='cuda')   # no pretend GPU outside
    assert accelerate.Accelerator(cpu=True).device == torch.device('cpu')   # accelerate forgot the pretend GPU


# One GRPO step on the pretend GPU. Cheap objectives (no tesseract subprocess) and two sampling steps keep each case at a
# few seconds; the device paths are the trainer's, whatever the rewards. The GPU presets train in bf16 under autocast,
# which the harness re-enacts with CUDA's autocast lists.
STEP = dict(steps=1, sample_steps=2, eval_every=0, save_every=0, objectives='colorfulness:1,jpeg_compressibility:1,brisque:1')
PRECISION = {'fp32': {}, 'bf16': dict(dtype='bfloat16', mixed_precision='bf16'), 'fp16': dict(dtype='float16', mixed_precision='fp16')}
@pytest.mark.parametrize('scheduler,conflict_every,precision', [
    pytest.param('p3', 1, 'fp32', id='p3-conflicts'), pytest.param('upgrad', 0, 'fp32', id='upgrad'),
    pytest.param('upgrad', 1, 'fp32', id='upgrad-conflicts'), pytest.param('p3', 1, 'bf16', id='p3-conflicts-bf16-autocast'),
    pytest.param('upgrad', 1, 'fp16', id='upgrad-fp16')])
def test_grpo_step_on_pretend_gpu(tmp_path, scheduler, conflict_every, precision):
    from apex_nb.grpo import GRPOTrainer
    from apex_nb.config import make_config
    with pretend_cuda():
        balance = dict(aggregator=scheduler) if scheduler == 'upgrad' else dict(scheduler=scheduler)
        cfg = make_config('tiny-random', device='cuda', **balance, conflict_every=conflict_every, out_dir=str(tmp_path / 'run'),
                          **STEP, **PRECISION[precision])
        tr = GRPOTrainer(cfg)
        assert torch.device(tr.acc.device).type == 'cuda' and torch.zeros(1).to(tr.acc.device).device == torch.device('cuda', 0)
        for part in ('transformer', 'vae', 'text_encoder', 'text_encoder_2', 'text_encoder_3'):
            assert all(is_pretend(p) for p in getattr(tr.pipe, part).parameters()), part
        assert tr.params and all(is_pretend(p) and p.requires_grad for p in tr.params)          # the LoRA
        before = [p.detach().cpu().clone() for p in tr.params]
        rec = tr.train_step()
        assert math.isfinite(rec['loss']) and not rec['skipped_update'] and rec['grad_norm'] > 0
        assert any(not torch.equal(b, p.detach().cpu()) for b, p in zip(before, tr.params))   # the optimiser stepped
        assert all(p.grad is None or is_pretend(p.grad) for p in tr.params)
        if conflict_every: assert rec['cos'] is not None and len(rec['cos']) == 3


def test_model_rewards_follow_the_trainer_to_its_device(tmp_path):
    "Rewards with a `device` option (CLIP-based) run on the trainer's device unless reward_options names another."
    from apex_nb.grpo import GRPOTrainer
    from apex_nb.config import make_config
    kw = dict(objectives='clipscore:1,colorfulness:1', steps=1, eval_every=0, save_every=0)
    with pretend_cuda():
        t = GRPOTrainer(make_config('tiny-random', device='cuda', **kw, out_dir=str(tmp_path / 'gpu')))
        assert t.rewards['clipscore'].device == str(t.acc.device) == 'cuda'
    t = GRPOTrainer(make_config('tiny-random', **kw, reward_options={'clipscore': {'device': 'meta'}}, out_dir=str(tmp_path / 'own')))
    assert t.rewards['clipscore'].device == 'meta' and t.rewards['clipscore'].options['device'] == 'meta'
