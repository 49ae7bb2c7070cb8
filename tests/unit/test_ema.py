"""The sharded EMA keeps Ultralytics' ModelEMA semantics (checked unsharded here; sharded in test_backends.py)."""

import copy

import torch

from yoloscale.training.ema import ShardedEMA


def test_matches_ultralytics_model_ema():
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import ModelEMA

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False).train()
    theirs, ours = ModelEMA(model, tau=3.0), ShardedEMA(model, tau=3.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(4):
        out = model(torch.rand(2, 3, 64, 64))
        out = out if isinstance(out, (list, tuple)) else list(out.values())
        sum(o.float().square().mean() for o in out if torch.is_tensor(o)).backward()
        opt.step()
        opt.zero_grad()
        theirs.update(model)
        ours.update(model)
    assert ours.updates == theirs.updates == 4
    full = ours.full_state_dict()
    ref = theirs.ema.state_dict()
    assert set(full) == {k for k, v in ref.items() if v.is_floating_point()}
    for k, v in full.items():  # BN running statistics included
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=k)
    plain = ours.load_into(copy.deepcopy(model))
    torch.testing.assert_close(plain.state_dict()["model.0.conv.weight"], ref["model.0.conv.weight"])


def test_resume_restores_the_pieces():
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    ema = ShardedEMA(model)
    state = {k: v + 1 for k, v in ema.full_state_dict().items()}
    again = ShardedEMA(model)
    again.load_full_state_dict(state, updates=7)
    assert again.updates == 7
    assert all(torch.equal(again.full_state_dict()[k], v) for k, v in state.items())
