"""Property-based tests: config parsing and the file data loaders never fail with anything but DifftimeError.

Valid configs must be accepted (and build their SDE and network); anything else must be refused
with a DifftimeError. Generated npz / IDX / image-folder inputs must either load with the shape
and levels their contents imply, or be refused with a one-line DifftimeError.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from difftime.config import DEFAULTS, build_config, net_config, sde_config
from difftime.data import load_data
from difftime.errors import DifftimeError
from difftime.nets import net_from_config
from difftime.sde import sde_from_config

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------ configs


@st.composite
def valid_overrides(draw) -> dict[str, Any]:
    """Any subset of keys set to values inside their documented ranges."""
    kind = draw(st.sampled_from(["vp", "subvp", "ve"]))
    T_max = draw(st.floats(0.05, 10.0))
    eps = draw(st.floats(1e-6, 1e-2 * T_max))
    T = draw(st.floats(min(2 * eps, T_max), T_max))
    b0 = draw(st.floats(0.01, 5.0))
    s_min = draw(st.floats(1e-3, 1.0))
    sde = {
        "kind": kind,
        "T_max": T_max,
        "eps": eps,
        "b0": b0,
        "b1": b0 + draw(st.floats(0.1, 30.0)),
        "sigma_min": s_min,
        "sigma_max": s_min * draw(st.floats(1.5, 1e4)),
    }
    ch_mult = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    ch = 2 * draw(st.integers(1, 8))
    attn = sorted(draw(st.sets(st.integers(0, len(ch_mult) - 1))))
    mid = draw(st.booleans())
    widths = [ch * ch_mult[i] for i in attn] + ([ch * ch_mult[-1]] if mid else [])
    heads = draw(st.sampled_from([h for h in range(1, 5) if all(w % h == 0 for w in widths)]))
    net = {
        "kind": draw(st.sampled_from(["auto", "mlp", "unet"])),
        "ch": ch,
        "ch_mult": ch_mult,
        "attn_levels": attn,
        "mid_attention": mid,
        "heads": heads,
        "num_res_blocks": draw(st.integers(1, 2)),
        "groups": draw(st.integers(1, 8)),
        "dropout": draw(st.floats(0.0, 0.99)),
        "hidden": draw(st.integers(1, 32)),
        "depth": draw(st.integers(1, 3)),
        "time_dim": 2 * draw(st.integers(1, 8)),
    }
    train = {
        "T": T,
        "steps": draw(st.integers(1, 10**7)),
        "batch_size": draw(st.integers(1, 4096)),
        "lr": draw(st.floats(1e-8, 10.0)),
        "weight_decay": draw(st.floats(0.0, 1.0)),
        "warmup": draw(st.integers(0, 10**4)),
        "grad_clip": draw(st.floats(0.0, 100.0)),
        "ema_decay": draw(st.floats(0.0, 0.99999)),
        "weighting": draw(st.sampled_from(["standard", "likelihood"])),
        "importance_sampling": draw(st.booleans()),
        "bf16": draw(st.booleans()),
        "channels_last": draw(st.booleans()),
        "log_every": draw(st.integers(1, 1000)),
        "ckpt_every": draw(st.integers(1, 1000)),
        "keep_checkpoints": draw(st.integers(1, 20)),
        "skip_nonfinite": draw(st.integers(0, 100)),
    }
    # Keys that constrain each other are set or left out together: the horizon, and the U-Net's
    # attention layout (heads must divide the widths that ch, ch_mult and attn_levels give).
    tied = {"sde": {"T_max", "eps"}, "train": {"T"}, "net": {"ch", "ch_mult", "attn_levels", "mid_attention", "heads"}}
    keep_horizon, keep_layout = draw(st.booleans()), draw(st.booleans())
    out: dict[str, Any] = {"seed": draw(st.integers(0, 2**63 - 1))}
    for section, values in (("sde", sde), ("net", net), ("train", train)):
        chosen = draw(st.sets(st.sampled_from(sorted(set(values) - tied[section]))))
        if keep_layout if section == "net" else keep_horizon:
            chosen |= tied[section]
        out[section] = {k: values[k] for k in chosen}
    return out


@SETTINGS
@given(valid_overrides(), st.sampled_from([(2,), (1, 8, 8), (3, 6, 5)]))
def test_every_valid_config_is_accepted_and_its_network_runs(overrides, shape):
    config = build_config(overrides=json.loads(json.dumps(overrides)))
    assert config["seed"] == overrides["seed"]
    sde_from_config(sde_config(config))
    if config["net"]["kind"] == "unet":
        shape = (1, 8, 8)
    net = net_from_config(net_config(config, shape))
    x = torch.zeros(2, *shape)
    assert net(x, torch.full((2,), 0.5)).shape == x.shape


def _leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for key, value in tree.items():
        out += _leaves(value, (*prefix, key)) if isinstance(value, dict) else [((*prefix, key), value)]
    return out


LEAVES = {path: default for path, default in _leaves(DEFAULTS) if path[0] != "study"}
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(), st.text(max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=10,
)
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
WRONG_TYPE = {
    bool: st.one_of(st.integers(), st.text(max_size=3), st.none(), st.floats()),
    int: st.one_of(st.text(max_size=3), st.booleans(), st.none(), st.floats(), st.lists(st.integers(), max_size=2)),
    float: st.one_of(st.text(max_size=3), st.booleans(), st.none(), non_finite, st.lists(st.floats(), max_size=2)),
    str: st.one_of(st.integers(), st.none(), st.floats(), st.lists(st.text(max_size=2), max_size=2)),
    list: st.one_of(
        st.text(max_size=3),
        st.integers(),
        st.none(),
        st.lists(st.text(max_size=2), min_size=1, max_size=2),
        st.lists(st.booleans(), min_size=1, max_size=2),
    ),
}
# Values of the right type that break a range whatever the rest of the config holds.
OUT_OF_RANGE = {
    "seed": [-1, 2**63],
    "steps": [0, -5],
    "batch_size": [0],
    "log_every": [0],
    "ckpt_every": [0],
    "keep_checkpoints": [0, -1],
    "skip_nonfinite": [-1],
    "lr": [0.0, -1e-3],
    "warmup": [-1],
    "weight_decay": [-0.1],
    "grad_clip": [-1.0],
    "ema_decay": [1.0, -0.5, 7.0],
    "weighting": ["both", ""],
    "kind": ["nope"],
    "b0": [0.0, -1.0],
    "sigma_min": [0.0, -1.0],
    "T_max": [0.0, -2.0],
    "eps": [0.0, -1e-5],
    "T": [0.0, -1.0, 2.0],
    "hidden": [0],
    "depth": [0],
    "time_dim": [0, 3, 7],
    "ch": [0, 5],
    "num_res_blocks": [0],
    "groups": [0],
    "heads": [0],
    "dropout": [1.0, -0.1],
    "ch_mult": [[], [0], [1, -2]],
    "attn_levels": [[-1], [9]],
}
# The SDE keys a kind reads; the others are not validated under another kind.
SDE_KIND = {"b0": "vp", "b1": "vp", "sigma_min": "ve", "sigma_max": "ve"}


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(tree))
    node = out
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return out


@SETTINGS
@given(valid_overrides(), st.sampled_from(sorted(LEAVES)), st.data())
def test_a_wrong_type_non_finite_or_out_of_range_leaf_is_refused_naming_it(overrides, path, data):
    default, name = LEAVES[path], path[-1]
    choices = [WRONG_TYPE[type(default)]]
    if name in OUT_OF_RANGE:
        choices.append(st.sampled_from(OUT_OF_RANGE[name]))
    bad = data.draw(st.one_of(choices))
    # Pin the horizon and the SDE kind so that only the drawn leaf can be at fault.
    overrides = _set(_set(_set(overrides, ("sde", "T_max"), 1.0), ("sde", "eps"), 1e-5), ("train", "T"), 0.5)
    if name in SDE_KIND:
        overrides = _set(overrides, ("sde", "kind"), SDE_KIND[name])
    with pytest.raises(DifftimeError) as info:
        build_config(overrides=_set(overrides, path, bad))
    message = str(info.value)
    assert "\n" not in message and name in message, message


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(["data", "seed", "sde", "net", "train", "study", "extra"]), json_values, max_size=4
    ),
    st.dictionaries(st.sampled_from([p[-1] for p in LEAVES] + ["nope"]), json_values, max_size=4),
)
def test_arbitrary_json_is_accepted_or_refused_with_a_difftime_error(top, nested):
    for overrides in (top, {"train": nested}, {"net": nested}, {"sde": nested}):
        try:
            config = build_config(overrides=overrides)
        except DifftimeError as exc:
            assert "\n" not in str(exc)
            continue
        assert set(config) == set(DEFAULTS)


@SETTINGS
@given(
    st.one_of(
        st.binary(max_size=64), st.text(max_size=64).map(str.encode), json_values.map(lambda v: json.dumps(v).encode())
    )
)
def test_a_config_file_of_any_bytes_is_read_or_refused(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.json"
        path.write_bytes(content)
        try:
            config = build_config(config_file=path)
        except DifftimeError as exc:
            assert "\n" not in str(exc)
            return
        assert set(config) == set(DEFAULTS)


# ------------------------------------------------------------------------------- data loaders


def _loads_as(spec: str) -> Any:
    """The dataset, or None after a one-line DifftimeError that names the spec."""
    try:
        return load_data(spec)
    except DifftimeError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(spec), str(exc)
        return None


@st.composite
def npz_arrays(draw) -> dict[str, np.ndarray]:
    """train/test (and labels) that mostly agree, broken in one place or not at all."""
    dtypes = st.sampled_from([np.uint8, np.uint8, np.float32, np.float32, np.float64, np.int64, np.bool_])
    dtype = draw(dtypes)
    example = tuple(draw(st.lists(st.integers(0, 2), max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def array(n: int, shape: tuple[int, ...], kind) -> np.ndarray:
        return (rng.integers(0, 256, (n, *shape)) * draw(st.sampled_from([1, 0]))).astype(kind)

    arrays = {
        "train": array(draw(st.integers(0, 4)), example, dtype),
        "test": array(draw(st.integers(0, 3)), example, dtype),
    }
    for key in ("train_labels", "test_labels"):
        if draw(st.booleans()):
            n = len(arrays[key.split("_")[0]]) + draw(st.sampled_from([0, 0, 1]))
            arrays[key] = array(n, (), draw(dtypes))
    damage = draw(st.sampled_from(["none", "none", "nan", "test-dtype", "test-shape", "drop", "scalar"]))
    if damage == "nan" and arrays["train"].dtype.kind == "f" and arrays["train"].size:
        arrays["train"].flat[-1] = np.nan
    elif damage == "test-dtype":
        arrays["test"] = arrays["test"].astype(draw(dtypes))
    elif damage == "test-shape":
        arrays["test"] = array(len(arrays["test"]), tuple(draw(st.lists(st.integers(0, 2), max_size=3))), dtype)
    elif damage == "drop":
        del arrays[draw(st.sampled_from(["train", "test"]))]
    elif damage == "scalar":
        arrays["train"] = np.array(draw(st.integers(0, 255)), dtype=dtype)
    return arrays


@SETTINGS
@given(npz_arrays())
@example({"train": np.zeros((2, 0, 3), np.uint8), "test": np.zeros((1, 0, 3), np.uint8)})
def test_npz_inputs_load_with_the_implied_shape_or_are_refused(arrays):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npz"
        np.savez(path, **arrays)
        ds = _loads_as(f"npz:{path}")
    if ds is None:
        return
    train, test = arrays["train"], arrays["test"]
    assert len(ds.train) == len(train) >= 1 and len(ds.test) == len(test) >= 1 and min(ds.shape) >= 1
    if train.dtype == np.uint8:
        assert ds.shape == ((1, *train.shape[1:]) if train.ndim == 3 else train.shape[1:])
        assert ds.is_image and ds.scaler.levels == 256
        assert np.array_equal(ds.train.numpy().reshape(train.shape), train)
    else:
        assert train.dtype.kind == "f" and train.ndim == 2 and ds.shape == train.shape[1:]
        assert ds.scaler.levels is None and np.isfinite(ds.train.numpy()).all()


@SETTINGS
@given(st.binary(max_size=200))
def test_arbitrary_bytes_as_npz_are_refused(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npz"
        path.write_bytes(content)
        assert _loads_as(f"npz:{path}") is None


IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@st.composite
def idx_files(draw) -> dict[str, bytes]:
    """Four IDX files, each valid or broken in one of the ways files get broken."""
    h, w = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    counts = {"train": draw(st.integers(0, 6)), "t10k": draw(st.integers(0, 4))}
    files = {}
    for name in IDX_NAMES:
        split = name.split("-")[0]
        shape = (counts[split], h, w) if "images" in name else (counts[split],)
        header = struct.pack(">I", 0x0800 | len(shape)) + b"".join(struct.pack(">I", s) for s in shape)
        data = header + bytes(np.arange(math.prod(shape), dtype=np.uint8))
        damage = draw(st.sampled_from(["none", "none", "truncate", "extend", "magic", "gzip", "broken-gzip"]))
        if damage == "truncate":
            data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
        elif damage == "extend":
            data += draw(st.binary(min_size=1, max_size=8))
        elif damage == "magic":
            data = struct.pack(">I", draw(st.integers(0, 2**32 - 1))) + data[4:]
        elif damage == "gzip":
            data = gzip.compress(data)
        elif damage == "broken-gzip":
            data = gzip.compress(data)[: draw(st.integers(0, 20))]
        files[name] = data
    return files


@SETTINGS
@given(idx_files())
def test_idx_inputs_load_as_single_channel_uint8_images_or_are_refused(files):
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        ds = _loads_as(f"idx:{tmp}")
    if ds is not None:
        assert ds.is_image and ds.shape[0] == 1 and min(ds.shape) >= 1 and ds.scaler.levels == 256
        assert len(ds.train) >= 1 and len(ds.test) >= 1 and len(ds.labels_train) == len(ds.train)


@st.composite
def image_files(draw) -> list[bytes]:
    from PIL import Image

    files = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 5)) == 0:
            files.append(draw(st.binary(max_size=40)))
            continue
        size = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
        mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1"]))
        buf = io.BytesIO()
        Image.new(mode, size, color=draw(st.integers(0, 255))).save(buf, format="PNG")
        files.append(buf.getvalue())
    return files


@SETTINGS
@given(image_files())
def test_image_folders_load_as_uint8_images_or_are_refused(files):
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        for i, data in enumerate(files):
            (Path(tmp) / f"img{i}.png").write_bytes(data)
        images = []
        for i in range(len(files)):
            try:
                with Image.open(Path(tmp) / f"img{i}.png") as im:
                    images.append(im.copy())
            except Exception:
                images.append(None)
        ds = _loads_as(f"folder:{tmp}")
    if ds is not None:
        assert None not in images and len({im.size for im in images}) == 1
        channels = 1 if all(im.mode == "L" for im in images) else 3
        w, h = images[0].size
        assert ds.shape == (channels, h, w) and ds.scaler.levels == 256
        assert len(ds.train) + len(ds.test) == len(files)
