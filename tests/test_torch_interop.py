"""PyTorch interop: an imported PyTorch model predicts on [0, 1] images what it predicted in PyTorch
on normalised ones, goes back to PyTorch unchanged, and bad files are refused naming the problem."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'bdjax[torch]')")

from bdjax import checkpoint, models  # noqa: E402
from bdjax.cli import main  # noqa: E402
from bdjax.data.dataset import CIFAR10, GTSRB  # noqa: E402
from bdjax.interop import torch as interop  # noqa: E402
from bdjax.interop.torch_models import build, randomize_batch_norm  # noqa: E402

ARCHITECTURES = ("preact-resnet18-backdoorbench", "preact-resnet18", "resnet18", "resnet20", "vgg11-bn",
                 "vgg16-bn", "mobilenet-v2-torchvision")


def torch_logits(net, images, mean, std):
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        return net.eval()(x).numpy()


def random_net(name, num_classes=10, seed=0):
    torch.manual_seed(seed)
    return randomize_batch_norm(build(name, num_classes), torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def images():
    """f32[64, 32, 32, 3] in [0, 1]."""
    return np.random.default_rng(0).random((64, 32, 32, 3), dtype=np.float32)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_imported_model_gives_pytorchs_logits_within_1e4_and_goes_back_unchanged(name, images, tmp_path):
    mean, std, _ = interop.parse_normalization("cifar10")
    net = random_net(name)
    reference = torch_logits(net, images, mean, std)
    torch.save(net.state_dict(), tmp_path / "model.pt")

    loaded = interop.load_file(tmp_path / "model.pt")
    model = interop.resolve_model(name, loaded.state_dict)
    module = models.create(model, interop.with_normalization(CIFAR10, mean, std))
    variables = interop.from_state_dict(loaded.state_dict, module, model_name=model)
    logits = models.batched_logits(module, variables, images)

    assert model == name
    assert np.abs(logits - reference).max() <= 1e-4
    assert (logits.argmax(1) == reference.argmax(1)).all()
    fresh = build(name, 10)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in interop.to_state_dict(module, variables).items()},
                          strict=True)
    for key, value in net.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy(), err_msg=key)


def test_pytorch_variants_are_read_into_the_bdjax_models_that_match_them():
    keys = build("preact-resnet18-backdoorbench", 10).state_dict()
    assert interop.resolve_model("preact-resnet18", keys) == "preact-resnet18-backdoorbench"
    assert interop.resolve_model("preact-resnet18", build("preact-resnet18", 10).state_dict()) == "preact-resnet18"
    assert interop.resolve_model("mobilenet-v2", ()) == "mobilenet-v2-torchvision"


def test_bdjax_cifar_mobilenet_has_no_pytorch_layout_and_says_what_differs():
    module = models.create("mobilenet-v2", CIFAR10)
    with pytest.raises(interop.TorchInteropError, match="stride-2 stem, no expansion conv in the first block"):
        interop.to_state_dict(module, models.init_variables(module, jax.random.key(0)))


def test_normalisation_is_folded_into_the_run_and_survives_saving(images, tmp_path):
    net = random_net("resnet20", num_classes=43)
    torch.save(net.state_dict(), tmp_path / "r20.pt")
    assert main(["import-torch", str(tmp_path / "r20.pt"), "--model", "resnet20", "--dataset", "gtsrb",
                 "--normalize", "0.5,0.25", "--out", str(tmp_path / "run")]) == 0
    run = checkpoint.load(tmp_path / "run")
    assert tuple(run.module.mean) == (0.5,) * 3 and tuple(run.module.std) == (0.25,) * 3
    reference = torch_logits(net, images, (0.5,) * 3, (0.25,) * 3)
    assert np.abs(models.batched_logits(run.module, run.variables, images) - reference).max() <= 1e-4


def backdoorbench_result(net, tmp_path, **metadata):
    """A file shaped like BackdoorBench's attack_result.pt (numpy arrays among the extras)."""
    result = {"model": net.state_dict(), "model_name": "preactresnet18", "num_classes": 10,
              "clean_data": "cifar10", "img_size": (32, 32, 3), "data_path": "../data/cifar10",
              "bd_train": {"poison_indicator": np.zeros(5, np.int64)}, **metadata}
    torch.save(result, tmp_path / "attack_result.pt")
    return tmp_path / "attack_result.pt"


def test_backdoorbench_attack_result_names_the_keys_used_and_takes_its_normalisation(images, tmp_path, capsys):
    net = random_net("preact-resnet18-backdoorbench")
    path = backdoorbench_result(net, tmp_path)
    out = tmp_path / "run"
    assert main(["import-torch", str(path), "--attack", "badnets", "--target", "3", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "backdoorbench-attack-result"
    assert summary["keys_used"] == ["model", "model_name", "num_classes", "clean_data", "img_size"]
    assert set(summary["keys_ignored"]) == {"bd_train", "data_path"}
    assert summary["model"] == "preact-resnet18-backdoorbench" and summary["dataset"] == "cifar10"
    run = checkpoint.load(out)
    mean, std = interop.BACKDOORBENCH_NORMALIZATION["cifar10"]
    assert run.attack.name == "badnets" and run.target.target == 3
    assert np.abs(models.batched_logits(run.module, run.variables, images)
                  - torch_logits(net, images, mean, std)).max() <= 1e-4


@pytest.mark.realdata
def test_an_imported_backdoorbench_model_is_a_run_that_eval_and_defend_read(data_dir, tmp_path, capsys):
    path = backdoorbench_result(random_net("preact-resnet18-backdoorbench"), tmp_path)
    main(["import-torch", str(path), "--attack", "badnets", "--out", str(tmp_path / "run")])
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json", "--eval-limit", "100", "--data-dir", data_dir]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"acc", "asr", "sia"}
    assert main(["defend", "clp", str(tmp_path / "run"), "--json", "--eval-limit", "100", "--clean-per-class", "1",
                 "--data-dir", data_dir, "--out", str(tmp_path / "clp")]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "clp"
    assert checkpoint.load(tmp_path / "clp").record["input_normalization"]["std"] == [0.247, 0.243, 0.261]


def test_export_torch_writes_a_state_dict_the_pytorch_module_loads_strictly(images, tmp_path, capsys):
    net = random_net("vgg11-bn", num_classes=43)
    torch.save(net.state_dict(), tmp_path / "vgg.pt")
    main(["import-torch", str(tmp_path / "vgg.pt"), "--model", "vgg11-bn", "--dataset", "gtsrb",
          "--normalize", "none", "--out", str(tmp_path / "run")])
    assert main(["export-torch", str(tmp_path / "run"), "--out", str(tmp_path / "back.pt")]) == 0
    fresh = build("vgg11-bn", 43)
    fresh.load_state_dict(torch.load(tmp_path / "back.pt", weights_only=True), strict=True)
    np.testing.assert_allclose(torch_logits(fresh, images, (0.0,) * 3, (1.0,) * 3),
                               torch_logits(net, images, (0.0,) * 3, (1.0,) * 3), atol=1e-6)


def test_export_of_a_bdjax_model_loads_into_pytorch_with_the_datasets_normalisation(images, tmp_path):
    module = models.create("resnet20", GTSRB)
    variables = models.init_variables(module, jax.random.key(0))
    net = build("resnet20", 43)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in interop.to_state_dict(module, variables).items()})
    assert np.abs(torch_logits(net, images, GTSRB.mean, GTSRB.std)
                  - models.batched_logits(module, variables, images)).max() <= 1e-4


# --------------------------------------------------------------------------- bad input

def import_error(path, capsys, *extra):
    code = main(["import-torch", str(path), "--dataset", "cifar10", "--normalize", "cifar10",
                 "--out", str(path.parent / "run"), *extra])
    assert code == 2
    return capsys.readouterr().err


def test_wrong_architecture_names_the_keys_and_the_model_they_fit(tmp_path, capsys):
    torch.save(random_net("resnet20").state_dict(), tmp_path / "r20.pt")
    err = import_error(tmp_path / "r20.pt", capsys, "--model", "resnet18")
    assert "missing key(s) [layer2.0.shortcut" in err and "unexpected key(s) [layer1.2.conv1.weight" in err
    assert "its keys are those of resnet20" in err


def test_shape_mismatch_names_the_first_differing_key(tmp_path, capsys):
    torch.save(random_net("resnet18", num_classes=43).state_dict(), tmp_path / "r18.pt")
    err = import_error(tmp_path / "r18.pt", capsys, "--model", "resnet18")
    assert "linear.weight has shape (43, 512)" in err and "(10, 512)" in err


def test_torchvision_imagenet_resnet_is_refused_saying_what_differs(tmp_path, capsys):
    state = {k.replace("shortcut", "downsample").replace("linear", "fc"): v
             for k, v in random_net("resnet18").state_dict().items()}
    state["conv1.weight"] = torch.zeros(64, 3, 7, 7)
    torch.save(state, tmp_path / "tv.pt")
    err = import_error(tmp_path / "tv.pt", capsys, "--model", "resnet18")
    assert "7x7 stride-2" in err and "CIFAR stem" in err


def test_corrupt_truncated_and_non_state_dict_files_are_refused(tmp_path, capsys):
    torch.save(random_net("resnet20").state_dict(), tmp_path / "good.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:5000])
    assert "not a readable PyTorch file" in import_error(tmp_path / "truncated.pt", capsys, "--model", "resnet20")
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    assert "not a readable PyTorch file" in import_error(tmp_path / "noise.pt", capsys, "--model", "resnet20")
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    assert "not a state_dict" in import_error(tmp_path / "list.pt", capsys, "--model", "resnet20")
    torch.save({"conv1.weight": "not a tensor"}, tmp_path / "strings.pt")
    assert "not a state_dict" in import_error(tmp_path / "strings.pt", capsys, "--model", "resnet20")


class Payload:
    """Stands for a pickled object whose loading would run code."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_file_holding_code_is_refused_without_running_it(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save({"model": Payload()}, f, pickle_module=pickle)
    err = import_error(tmp_path / "evil.pt", capsys, "--model", "resnet20")
    assert "weights-only loading refuses" in err
    assert "this must never run" not in capsys.readouterr().out


def test_a_non_finite_weight_and_a_conflicting_backdoorbench_record_are_refused(tmp_path, capsys):
    state = random_net("resnet20").state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    assert "layer1.0.conv1.weight holds NaN" in import_error(tmp_path / "nan.pt", capsys, "--model", "resnet20")
    path = backdoorbench_result(random_net("preact-resnet18-backdoorbench"), tmp_path)
    assert "records model_name 'preactresnet18'" in import_error(path, capsys, "--model", "resnet18")


def test_bdjax_help_and_the_cli_parser_do_not_import_torch():
    code = ("import sys; from bdjax.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
