import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spade_kernels.sae.data import load_activations, make_heterogeneity, make_separability, scale_to_unit_norm


def test_separability_shapes_and_determinism():
    a, b = make_separability(1000, seed=3), make_separability(1000, seed=3)
    assert a.x.shape == (1000, 2) and a.x.dtype == torch.float32
    assert a.labels.dtype == torch.int64 and a.name == "separability"
    assert a.n_concepts == 13 and a.intrinsic_dim.tolist() == [2] * 13
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.x, make_separability(1000, seed=4).x)
    counts = torch.bincount(a.labels, minlength=13)
    assert counts.min() >= 1000 // 13 and counts.max() <= 1000 // 13 + 1


def test_separability_layout():
    # Centre at the origin, the inner ring at radius 2 and the outer ring at radius 4.
    ds = make_separability(13000, noise=0.1, seed=0)
    radii = torch.stack([ds.x[ds.labels == c].mean(0).norm() for c in range(13)])
    expected = torch.tensor([0.0] + [2.0] * 6 + [4.0] * 6)
    torch.testing.assert_close(radii, expected, atol=0.02, rtol=0)


def test_separability_global_rng_untouched():
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    make_separability(100, seed=1)
    assert torch.equal(torch.rand(3), before)


def test_heterogeneity_intrinsic_dimensions():
    dims = (1, 3, 6)
    ds = make_heterogeneity(900, d=16, dims=dims, noise=0.01, seed=1)
    assert ds.x.shape == (900, 16) and ds.x.dtype == torch.float32
    assert ds.intrinsic_dim.tolist() == list(dims)
    assert torch.equal(ds.x, make_heterogeneity(900, d=16, dims=dims, noise=0.01, seed=1).x)
    for c, k in enumerate(dims):
        part = ds.x[ds.labels == c]
        sv = torch.linalg.svdvals(part - part.mean(0))
        # Directions with variance well above the noise level span the concept's subspace.
        assert int((sv > 0.1 * part.shape[0] ** 0.5).sum()) == k


def test_heterogeneity_bad_dims():
    with pytest.raises(ValueError, match="dims"):
        make_heterogeneity(100, d=8, dims=(4, 16))


@pytest.fixture
def acts():
    return torch.randn(4, 5, 6)


@pytest.mark.parametrize(
    "suffix, write",
    [
        (".pt", lambda p, t: torch.save(t, p)),
        (".pt", lambda p, t: torch.save({"x": t}, p)),
        (".pt", lambda p, t: torch.save({"activations": t, "labels": torch.zeros(3)}, p)),
        (".npy", lambda p, t: np.save(p, t.numpy())),
        (".safetensors", lambda p, t: save_file({"acts": t}, p)),
        (".safetensors", lambda p, t: save_file({"activations": t, "other": torch.zeros(2)}, p)),
    ],
)
def test_load_activations_formats(tmp_path, acts, suffix, write):
    path = tmp_path / f"a{suffix}"
    write(path, acts)
    out = load_activations(path)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, acts.reshape(20, 6))


def test_load_activations_casts_half(tmp_path):
    path = tmp_path / "h.pt"
    torch.save(torch.ones(3, 2, dtype=torch.float16), path)
    assert load_activations(path).dtype == torch.float32


@pytest.mark.parametrize(
    "name, write, match",
    [
        ("a.txt", lambda p: p.write_text("1 2"), "unsupported file type"),
        ("a.pt", lambda p: torch.save(torch.ones(5), p), "shape"),
        ("a.npy", lambda p: np.save(p, np.ones((3, 2), dtype=np.int32)), "floating point"),
        ("a.pt", lambda p: torch.save({"a": torch.ones(2, 2), "b": torch.ones(2, 2)}, p), "2 tensors"),
        ("a.pt", lambda p: torch.save([1, 2], p), "no tensor found"),
        ("a.safetensors", lambda p: save_file({"a": torch.ones(0, 4)}, p), "shape"),
    ],
)
def test_load_activations_errors(tmp_path, name, write, match):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match=match) as info:
        load_activations(path)
    assert str(path) in str(info.value)


def test_load_activations_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_activations(tmp_path / "nope.pt")


def test_scale_to_unit_norm():
    x = 7.0 * torch.randn(500, 10) + 3.0
    scaled, factor = scale_to_unit_norm(x)
    torch.testing.assert_close(scaled.pow(2).sum(1).mean(), torch.tensor(10.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(scaled, x * factor)


@pytest.mark.parametrize("x", [torch.zeros(4, 3), torch.ones(3), torch.ones(0, 3)])
def test_scale_to_unit_norm_errors(x):
    with pytest.raises(ValueError):
        scale_to_unit_norm(x)


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.pt", b""),
        ("text.pt", b"hello, these are not tensors\n"),
        ("empty.npy", b""),
        ("text.npy", b"not an array"),
        ("bad.safetensors", b"\xff" * 16),
        ("short.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
    ],
)
def test_damaged_files_are_one_value_error_naming_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{path}: not a readable \.\w+ file"):
        load_activations(path)


def test_truncated_files_are_value_errors(tmp_path):
    x = torch.randn(64, 8)
    for name, write in (
        ("t.pt", lambda p: torch.save(x, p)),
        ("t.npy", lambda p: np.save(p, x.numpy())),
        ("t.safetensors", lambda p: save_file({"activations": x}, str(p))),
    ):
        path = tmp_path / name
        write(path)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        with pytest.raises(ValueError, match=str(path)):
            load_activations(path)


def test_damaged_file_is_a_clean_cli_error(tmp_path, capsys):
    from spade_kernels.sae.cli import main

    path = tmp_path / "acts.pt"
    path.write_bytes(b"")
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spade-kernels: error:") and str(path) in err and "\n" not in err


def test_a_file_with_a_non_finite_row_is_refused_naming_it(tmp_path, capsys):
    from spade_kernels.sae.cli import main

    x = torch.randn(300, 4)
    x[123, 1] = float("inf")
    path = tmp_path / "acts.pt"
    torch.save(x, path)
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"spade-kernels: error: {path}: row 123 holds NaN or inf values (or values "
        "beyond float32's range) (1 such rows in rows 0–299); "
        "SpaDE needs finite activations"
    )
    assert not (tmp_path / "r" / "sae_weights.safetensors").exists()
