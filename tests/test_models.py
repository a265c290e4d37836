import copy

import pytest
import torch

from hrhf.models import (
    build_model,
    classifier_layers,
    load_checkpoint,
    num_outputs,
    save_checkpoint,
    widen_classifier,
)


def _probs(model, x):
    with torch.no_grad():
        return model.eval()(x).softmax(1)


@pytest.mark.parametrize("name", ["small", "lraspp_mobilenet_v3_large"])
def test_mib_widening_keeps_old_predictions(name):
    torch.manual_seed(0)
    old = build_model(name, 5, width=8).eval()
    if name != "small":  # torchvision heads start with zero bias: give them a real one
        for layer in classifier_layers(old):
            torch.nn.init.normal_(layer.bias)
    new = widen_classifier(copy.deepcopy(old), 3, "mib")
    assert num_outputs(new) == 8
    x = torch.randn(2, 3, 64, 64)
    p_old, p_new = _probs(old, x), _probs(new, x)
    # old classes keep their probability; background + new classes share the old background's
    assert torch.allclose(p_new[:, 1:5], p_old[:, 1:5], atol=1e-5)
    assert torch.allclose(p_new[:, [0, 5, 6, 7]].sum(1), p_old[:, 0], atol=1e-5)
    # so wherever the old model predicted an old class, the new one does too
    old_pred = p_old.argmax(1)
    assert torch.equal(p_new.argmax(1)[old_pred > 0], old_pred[old_pred > 0])


def test_random_widening_keeps_old_weights():
    old = build_model("small", 4, width=4)
    new = widen_classifier(copy.deepcopy(old), 2, "random")
    assert torch.equal(new.classifier.weight[:4], old.classifier.weight)
    assert not torch.equal(new.classifier.weight[4], old.classifier.weight[0])


def test_checkpoint_roundtrip_weights_only(tmp_path):
    model = build_model("small", 7, width=4)
    path = str(tmp_path / "ckpt" / "step-1.pt")
    save_checkpoint(path, model, model_name="small", width=4, classes=[[1, 2, 3, 4], [5, 6]], step=1,
                    config={"seed": 3, "data": {"protocol": "4-2"}})
    loaded, payload = load_checkpoint(path)
    assert payload["classes"] == [[1, 2, 3, 4], [5, 6]] and payload["config"]["seed"] == 3
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_probs(model, x), _probs(loaded, x))
    # the file is readable with weights_only=True, i.e. holds no pickled code
    torch.load(path, weights_only=True)
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an hrhf checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))


def test_backbone_weights_from_file(tmp_path):
    from torchvision.models import mobilenet_v3_large

    source = mobilenet_v3_large(weights=None)
    path = tmp_path / "mnv3.pt"
    torch.save(source.features.state_dict(), path)
    # torchvision's segmentation backbone keeps the classification model's feature names
    model = build_model("deeplabv3_mobilenet_v3_large", 4, backbone_weights=str(path))
    backbone = model.net.backbone.state_dict()
    key = next(k for k in backbone if k.endswith("weight"))
    assert torch.equal(backbone[key], source.features.state_dict()[key])


def test_backbone_weights_mismatch(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"nothing.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="no tensor matches"):
        build_model("small", 3, width=4, backbone_weights=str(path))


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet9000", 3)


def test_deeplabv3_resnet101_widens_and_round_trips(tmp_path):
    torch.manual_seed(0)
    old = build_model("deeplabv3_resnet101", 5, backbone_weights=None).eval()
    torch.nn.init.normal_(classifier_layers(old)[0].bias)  # torchvision starts it at zero: give it a real one
    new = widen_classifier(copy.deepcopy(old), 3, "mib").eval()
    assert num_outputs(new) == 8
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        logits_old, logits_new = old(x), new(x)
    assert logits_new.shape == (1, 8, 65, 65)
    # old classes keep their logits; background and the new classes all get the old background's, less log 4
    assert torch.allclose(logits_new[:, 1:5], logits_old[:, 1:5], atol=1e-4)
    shifted_background = logits_old[:, :1] - torch.log(torch.tensor(4.0))
    assert torch.allclose(logits_new[:, [0, 5, 6, 7]], shifted_background.expand(-1, 4, -1, -1), atol=1e-4)
    p_old, p_new = logits_old.softmax(1), logits_new.softmax(1)
    assert torch.allclose(p_new[:, 1:5], p_old[:, 1:5], atol=1e-5)
    assert torch.allclose(p_new[:, [0, 5, 6, 7]].sum(1), p_old[:, 0], atol=1e-5)

    path = str(tmp_path / "step-1.pt")
    save_checkpoint(path, new, model_name="deeplabv3_resnet101", width=32, classes=[[1, 2, 3, 4], [5, 6, 7]],
                    step=1, config={})
    loaded, payload = load_checkpoint(path)
    assert payload["model"] == {"name": "deeplabv3_resnet101", "width": 32, "num_outputs": 8}
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), logits_new)
