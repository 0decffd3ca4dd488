"""User spec folders (``--spec-dir``, ``spec_dir=``, ``QKWEIGHTS_SPEC_PATH``) and the typed spec schema.

References: a checkpoint whose tensors and config keys were renamed so that no shipped spec knows them, read
through one spec file in a user folder, against (a) the paper's dense D×D SVD of W_q,hᵀW_k,h computed from the
original `vit` fixture's tensors read with the safetensors package, and (b) the transformers golden of the `vit`
fixture (tests/fixtures/golden/vit.npz, make_fixtures.py).
"""

import json
import re
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from conftest import GOLDEN, MODELS
from safetensors.numpy import load_file, save_file

import qkweights
from qkweights.cli import main
from qkweights.errors import SpecError
from qkweights.specs.load import open_model
from qkweights.specs.registry import SPEC_PATH_ENV, builtin_spec_dir, load_specs
from qkweights.specs.resolvers import RESOLVERS
from qkweights.specs.schema import SECTIONS, Spec
from qkweights.vision.model import _MODELS

# The renaming of the hidden family: transformers ViT name → the hidden checkpoint's name.
RENAMES = [
    ("embeddings.patch_embeddings.projection", "stem.conv"),
    ("embeddings.cls_token", "stem.summary"),
    ("embeddings.position_embeddings", "stem.where"),
    ("encoder.layer.", "trunk.unit"),
    (".attention.attention.query", ".mix.ask"),
    (".attention.attention.key", ".mix.offer"),
    (".attention.attention.value", ".mix.give"),
    (".attention.output.dense", ".mix.merge"),
    (".layernorm_before", ".pre_mix"),
    (".layernorm_after", ".pre_mlp"),
    (".intermediate.dense", ".mlp.up"),
    (".output.dense", ".mlp.down"),
    ("layernorm.", "last_norm."),
    ("pooler.dense", "unused.pool"),
]
HIDDEN_SPEC = """name = "hidden-vit"
description = "a ViT whose tensors and config keys were renamed (tests/specs/test_user_specs.py)"
example = "a local folder"
config_file = "settings.json"
prefixes = ["net."]

[detect]
model_type = ["hidden"]
require = ["trunk.unit{i}.mix.ask.weight", "stem.summary"]

[dims]
layers = "depth"
hidden = "width"
heads = "n_heads"
eps = "ln_eps"
act = { value = "gelu" }
patch_size = { shape = "stem.conv.weight", axis = 2 }
image_size = ["picture", 224]

[attention]
q = "trunk.unit{i}.mix.ask"
k = "trunk.unit{i}.mix.offer"
v = "trunk.unit{i}.mix.give"
out = "trunk.unit{i}.mix.merge"

[block]
norm1 = "trunk.unit{i}.pre_mix"
norm2 = "trunk.unit{i}.pre_mlp"
fc1 = "trunk.unit{i}.mlp.up"
fc2 = "trunk.unit{i}.mlp.down"

[embeddings]
tokens = ["cls", "patches"]
patch = "stem.conv"
cls = "stem.summary"
position = "stem.where"
position_tokens = ["cls", "patches"]
final_norm = "last_norm"

[preprocess]
format = "hf"
config_file = "preprocessor_config.json"
"""


def rename(name):
    for old, new in RENAMES:
        name = name.replace(old, new)
    return "net." + name


@pytest.fixture
def hidden(tmp_path):
    """(checkpoint folder, user spec folder) of the hidden family: the `vit` fixture's weights under other names."""
    ckpt, specs = tmp_path / "hidden-ckpt", tmp_path / "my-specs"
    ckpt.mkdir()
    specs.mkdir()
    tensors = load_file(str(MODELS / "vit" / "model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, str(ckpt / "model.safetensors"))
    cfg = json.loads((MODELS / "vit" / "config.json").read_text())
    (ckpt / "settings.json").write_text(
        json.dumps(
            {
                "model_type": "hidden",
                "depth": cfg["num_hidden_layers"],
                "width": cfg["hidden_size"],
                "n_heads": cfg["num_attention_heads"],
                "ln_eps": cfg["layer_norm_eps"],
                "picture": cfg["image_size"],
            }
        )
    )
    shutil.copy(MODELS / "vit" / "preprocessor_config.json", ckpt)
    (specs / "hidden-vit.toml").write_text(HIDDEN_SPEC)
    return ckpt, specs


def test_renamed_checkpoint_is_unknown_without_its_spec(hidden):
    ckpt, _ = hidden
    with pytest.raises(SpecError, match=r"^unknown checkpoint: no family matches its tensors"):
        qkweights.profile(str(ckpt))


def test_user_spec_profile_equals_the_dense_svd(hidden):
    ckpt, specs = hidden
    prof = qkweights.profile(str(ckpt), spec_dir=specs)
    assert prof.model.family == "hidden-vit" and prof.singular_values.shape == (2, 4, 8)
    raw = load_file(str(MODELS / "vit" / "model.safetensors"))  # the original names, read independently of any spec
    for l in range(2):
        wq = raw[f"encoder.layer.{l}.attention.attention.query.weight"].astype(np.float64).reshape(4, 8, 32)
        wk = raw[f"encoder.layer.{l}.attention.attention.key.weight"].astype(np.float64).reshape(4, 8, 32)
        for h in range(4):
            s = np.linalg.svd(wq[h].T @ wk[h], compute_uv=False)[:8]  # the paper's dense D×D SVD
            np.testing.assert_allclose(prof.singular_values[l, h], s, rtol=1e-9)
            assert np.sum(prof.singular_values[l, h] * prof.cosines[l, h]) == pytest.approx(
                np.sum(wq[h] * wk[h]), rel=1e-10
            )


def test_user_spec_forward_equals_transformers(hidden):
    ckpt, specs = hidden
    model = qkweights.load_model(str(ckpt), spec_dir=[specs])
    with np.load(GOLDEN / "vit.npz") as z:
        g = {k: z[k] for k in z.files}
    out = model.forward(g["pixel_values"], attentions=True)
    np.testing.assert_allclose(np.stack(out.hidden_states), g["hidden_states"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.stack([out.attentions[l] for l in range(2)]), g["attentions"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.last_hidden_state, g["last_hidden_state"], rtol=0, atol=1e-5)
    assert model.preprocessing_origin == "preprocessor_config.json"
    # worker processes open the model by its ModelRef, which carries the spec resolved from the user folder
    assert model.ref.spec == model.checkpoint.spec and model.ref.spec.path == specs / "hidden-vit.toml"
    _MODELS.pop(model.ref)
    assert model.ref.open().checkpoint.spec.name == "hidden-vit"


def test_spec_path_environment_variable(hidden, monkeypatch, tmp_path):
    ckpt, specs = hidden
    monkeypatch.setenv(SPEC_PATH_ENV, f"{tmp_path / 'elsewhere'}")
    with pytest.raises(SpecError) as e:
        qkweights.profile(str(ckpt))
    assert str(e.value) == (
        f"spec folder {tmp_path / 'elsewhere'} (from {SPEC_PATH_ENV}) does not exist or is not a folder; "
        "give a folder of .toml spec files"
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv(SPEC_PATH_ENV, f"{tmp_path / 'elsewhere'}:{specs}")
    assert qkweights.profile(str(ckpt)).model.family == "hidden-vit"


def test_spec_dir_on_the_command_line(hidden, tmp_path, capsys):
    ckpt, specs = hidden
    out = tmp_path / "out"
    assert main(["profile", str(ckpt), "--spec-dir", str(specs), "--out", str(out), "--no-plots", "--quiet"]) == 0
    assert json.loads((out / "profile.json").read_text())["model"]["family"] == "hidden-vit"
    assert main(["inspect", str(ckpt), "--spec-dir", str(specs)]) == 0
    assert "family    hidden-vit: a ViT whose tensors" in capsys.readouterr().out
    assert main(["inspect", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkweights: error: unknown checkpoint") and err.count("\n") == 1
    assert main(["specs", "--spec-dir", str(specs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("hidden-vit ") and line.endswith(f"({specs / 'hidden-vit.toml'})") for line in lines)
    assert any(line.startswith("hf-vit ") and line.endswith("(hf-vit.toml)") for line in lines)


def test_the_shipped_specs_of_a_checkout_are_its_model_specs_folder():
    # qkweights/specs/registry.py: the checkout's root is three folders up (an installed copy has
    # no model_specs/ there and reads the package data qkweights.model_specs instead)
    assert builtin_spec_dir() == Path(__file__).resolve().parents[2] / "model_specs"


def test_a_user_spec_replaces_the_built_in_one_and_specs_says_so(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, label in ((first, "first"), (second, "second")):
        folder.mkdir()
        text = (builtin_spec_dir() / "hf-vit.toml").read_text()
        (folder / "hf-vit.toml").write_text(text.replace('description = "', f'description = "{label}: ', 1))
    specs = load_specs(spec_dir=[first, second])  # earlier folders win
    assert (
        specs["hf-vit"].description.startswith("first: ")
        and specs["hf-vit"].overrides == builtin_spec_dir() / "hf-vit.toml"
    )
    _, ck = qkweights.specs.load.open_model(str(MODELS / "vit"), spec_dir=[second, first])
    assert ck.spec.description.startswith("second: ") and ck.spec.user
    assert main(["specs", "--spec-dir", str(first)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("hf-vit "))
    assert line.endswith(f"({first / 'hf-vit.toml'}, replacing the built-in hf-vit.toml)")


# ----------------------------------------------------------------------------- the schema refuses mistakes

TIMM = (builtin_spec_dir() / "timm-vit.toml").read_text()


@pytest.mark.parametrize(
    "old, new, message",
    [
        (
            'scale2 = "blocks.{i}.ls2.gamma"',
            'scale_2 = "blocks.{i}.ls2.gamma"',
            "unknown key 'scale_2' in [block] (did you mean 'scale2'?); known: norm1, norm2, fc1, fc2, "
            "swiglu_in, swiglu_out, scale1, scale2",
        ),
        (
            'prefixes = [""]',
            'prefix = [""]',
            "unknown key 'prefix' in the top level (did you mean 'prefixes'?); known: ",
        ),
        (
            '[preprocess]\nformat = "timm"',
            '[preprocess]\nformat = "tf"',
            '[preprocess] format is "tf"; it must be one of hf, timm, open_clip',
        ),
        ('patch = "patch_embed.proj"', "patch = 16", "[embeddings] patch is 16; it must be a module"),
        (
            'norm1 = "blocks.{i}.norm1"',
            'norm1 = { weight = "blocks.{i}.norm1.weight", gain = "x" }',
            "[block] norm1: unknown key 'gain' in a module table",
        ),
        (
            'registers = "reg_token"',
            'registers = ["reg_token"]',
            '[embeddings] registers is ["reg_token"]; it must be a tensor name',
        ),
        (
            '\ntokens = ["cls", "registers", "patches"]',
            '\ntokens = ["cls", "register", "patches"]',
            "[embeddings] tokens: unknown token kind 'register'",
        ),
        (
            'no_embed_class = "rows"',
            "no_embed_class = 1",
            '[embeddings] no_embed_class is 1; it must be true, false or "rows"',
        ),
        (
            'patch_size = { shape = "patch_embed.proj.weight", axis = 2 }',
            'patch_size = { shape = "patch_embed.proj.weight", axes = 2 }',
            "[dims] patch_size: unknown key 'axes' in {shape = …} (did you mean 'axis'?)",
        ),
        (
            'layers = { count = "blocks.{i}.attn.qkv.weight" }',
            'layers = { counts = "blocks.{i}.attn.qkv.weight" }',
            "[dims] layers: a resolver table needs exactly one of value, config, shape, count, div, mul, "
            "relative_window, lookup, match",
        ),
        (
            'interpolation = { value = "bicubic_antialias" }',
            'interpolate = { value = "bicubic_antialias" }',
            "unknown key 'interpolate' in [dims] (did you mean 'interpolation'?)",
        ),
        ('norm2 = "blocks.{i}.norm2"\n', "", "[block] lacks 'norm2', which the forward pass of a vision family needs"),
        (
            'config_has = ["architecture"]',
            'config_has = "architecture"',
            '[detect] config_has is "architecture"; it must be a list of texts',
        ),
        (
            '[attention]\nqkv = "blocks.{i}.attn.qkv"',
            '[attention]\nqkv = "blocks.{i}.attn.qkv"\nq = "blocks.{i}.attn.q"',
            "[attention]: give either a fused qkv or separate q, k, v, not both",
        ),
    ],
)
def test_spec_mistakes_are_refused_in_one_line_naming_file_and_key(tmp_path, capsys, old, new, message):
    assert TIMM.count(old) == 1
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "timm-vit.toml").write_text(TIMM.replace(old, new))
    with pytest.raises(SpecError) as e:
        load_specs(spec_dir=folder)
    assert str(e.value).startswith(f"{folder / 'timm-vit.toml'}: {message}") and "\n" not in str(e.value)
    assert main(["inspect", str(MODELS / "timm-vit"), "--spec-dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qkweights: error: {folder / 'timm-vit.toml'}: {message}") and err.count("\n") == 1


def test_shipped_spec_mistakes_name_the_file(tmp_path):
    folder = shutil.copytree(builtin_spec_dir(), tmp_path / "specs")
    (folder / "hf-vit.toml").write_text(
        (folder / "hf-vit.toml").read_text().replace("[block]\n", '[block]\nscale_1 = "x"\n')
    )
    with pytest.raises(
        SpecError, match=r"^hf-vit.toml: unknown key 'scale_1' in \[block\] \(did you mean 'scale1'\?\)"
    ):
        load_specs(folder)


# ----------------------------------------------------------------------------- model_specs/README.md = the schema


def readme_tables(readme: str) -> tuple[dict[str, set[str]], set[str]]:
    """({section: the keys of its `| key | meaning |` table} ('' = top level), the resolver heads of the resolver
    table)."""
    keys, heads, section, table = {}, set(), None, None
    for line in readme.splitlines():
        if line.startswith("## "):
            m = re.search(r"`\[(\w+)\]`", line)
            section, table = (m.group(1) if m else "" if line == "## Top level" else None), None
        elif line.startswith(("| key |", "| resolver |")):
            table = line.split("|")[1].strip()
        elif line.startswith("| ") and table == "key" and section is not None:
            keys.setdefault(section, set()).update(re.findall(r"`(\w+)`", line.split(" | ")[0]))
        elif line.startswith("| ") and table == "resolver":
            heads.update(re.findall(r"`\{ (\w+) =", line.split(" | ")[0]))
        elif not line.startswith("|"):
            table = None
    return keys, heads


def test_readme_documents_exactly_the_schema():
    keys, heads = readme_tables((builtin_spec_dir() / "README.md").read_text())
    assert keys.pop("") == {f.name for f in fields(Spec) if f.metadata["kind"] != "internal"}
    assert keys == {name: {f.name for f in fields(cls)} for name, cls in SECTIONS.items()}
    assert heads == set(RESOLVERS)


def test_every_spec_field_has_a_kind_the_parser_reads():
    for cls in (Spec, *SECTIONS.values()):
        for f in fields(cls):
            assert f.metadata.get("kind") in (
                "text",
                "texts",
                "tensor",
                "tensors",
                "module",
                "resolver",
                "bool",
                "tokens",
                "choice",
                "no_embed_class",
                "section",
                "internal",
            ), (cls, f.name)


def test_readme_checker_can_fail():
    keys, _ = readme_tables("## `[block]`\n| key | meaning |\n|---|---|\n| `norm1`, `scale_1` | x |\n")
    assert keys == {"block": {"norm1", "scale_1"}} != {"block": {f.name for f in fields(SECTIONS["block"])}}


# ----------------------------------------------------------------------------- whose value: spec, config, tensors

HF_VIT = (builtin_spec_dir() / "hf-vit.toml").read_text()


def _user_hf_vit(tmp_path, old, new, label="specs"):
    """A user folder holding hf-vit.toml with ``old`` replaced by ``new`` (it replaces the built-in family)."""
    assert HF_VIT.count(old) == 1
    folder = tmp_path / label
    folder.mkdir()
    (folder / "hf-vit.toml").write_text(HF_VIT.replace(old, new))
    return folder


@pytest.mark.parametrize(
    "old, new, message",
    [
        (
            'heads = "num_attention_heads"',
            'heads = "num_attention_heads"\nhead_dim = 0',
            "[dims] head_dim in the spec is 0; it must be a positive integer (head_dim); fix the spec file",
        ),
        (
            'layers = "num_hidden_layers"',
            "layers = 100",
            "[dims] layers in the spec is 100, but the weight files hold 2 layers "
            "(encoder.layer.N.attention.attention.query.weight); fix the spec file or choose another family=NAME",
        ),
        (
            'heads = "num_attention_heads"',
            "heads = 5",
            "5 heads ([dims] heads in the spec) do not divide the width 32 (config.json hidden_size); fix the "
            "spec file or choose another family=NAME",
        ),
        (  # a value looked up in the spec's own table is the spec's, though the key came from the tensors
            'heads = "num_attention_heads"',
            'heads = { lookup = { shape = "embeddings.patch_embeddings.projection.weight", axis = 0 }, '
            'table = { "32" = 5 } }',
            "5 heads ([dims] heads in the spec) do not divide the width 32 (config.json hidden_size); fix the "
            "spec file or choose another family=NAME",
        ),
        (  # … or from the config
            'heads = "num_attention_heads"',
            'heads = { match = "model_type", table = { vi = 5 } }',
            "5 heads ([dims] heads in the spec) do not divide the width 32 (config.json hidden_size); fix the "
            "spec file or choose another family=NAME",
        ),
        (
            'heads = "num_attention_heads"',
            'heads = "num_attention_heads"\nhead_dim = 4',
            "4 heads (config.json num_attention_heads) of width 4 ([dims] head_dim in the spec) do not make the "
            "width 32 (config.json hidden_size); fix the spec file or choose another family=NAME",
        ),
        (
            'hidden = "hidden_size"',
            "hidden = 64",
            "layer 0 q weight has shape (32, 32), expected (64, 64) from the width 64 ([dims] hidden in the spec); "
            "fix the spec file or choose another family=NAME",
        ),
    ],
)
def test_literal_spec_values_are_blamed_on_the_spec_file_and_key(tmp_path, capsys, old, new, message):
    folder = _user_hf_vit(tmp_path, old, new)
    prefix = f"hf-vit ({folder / 'hf-vit.toml'}): "
    with pytest.raises(qkweights.errors.QkError) as e:
        qkweights.profile(str(MODELS / "vit"), spec_dir=folder)
    assert str(e.value) == prefix + message
    out = ["--out", str(tmp_path / "out"), "--no-plots", "--quiet"]
    assert main(["profile", str(MODELS / "vit"), "--spec-dir", str(folder), *out]) == 2
    cli = message.replace("family=NAME", "--family NAME")  # the command line words options as flags
    assert capsys.readouterr().err == f"qkweights: error: {prefix}{cli}\n"


def test_config_and_tensor_values_are_still_blamed_on_their_source(tmp_path):
    # the same mistakes through the config (the shipped spec): the config is named, the spec file is not
    folder = shutil.copytree(MODELS / "vit", tmp_path / "vit")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 5}))
    with pytest.raises(qkweights.errors.CheckpointError) as e:
        open_model(str(folder))
    assert str(e.value) == (
        "hf-vit: 5 heads (config.json num_attention_heads) do not divide the width 32 (config.json hidden_size); "
        "fix the config or choose another family=NAME"
    )
    # a value read from the tensors through a wrong spec entry: the tensor is named, the spec's [dims] key is to fix
    spec = _user_hf_vit(tmp_path, 'hidden = "hidden_size"', 'hidden = { shape = "layernorm.weight", axis = 1 }')
    with pytest.raises(qkweights.errors.CheckpointError) as e:
        open_model(str(MODELS / "vit"), spec_dir=spec)
    assert str(e.value) == (
        f"hf-vit ({spec / 'hf-vit.toml'}): layernorm.weight shape[1] is not usable; it must be a positive integer "
        "(hidden); fix [dims] hidden in the spec"
    )


def test_a_user_spec_replacing_a_built_in_one_is_named_when_it_does_not_match(tmp_path):
    folder = _user_hf_vit(tmp_path, 'require = ["embeddings.cls_token"', 'require = ["embeddings.missing"')
    with pytest.raises(SpecError) as e:
        open_model(str(MODELS / "vit"), family="hf-vit", spec_dir=folder)
    assert str(e.value).startswith(
        f"the checkpoint is not of family 'hf-vit' ({folder / 'hf-vit.toml'}): it lacks one of embeddings.missing, "
    )


def test_a_user_spec_replacing_a_built_in_one_is_named_in_provenance(tmp_path):
    import hashlib

    folder = _user_hf_vit(tmp_path, 'description = "', 'description = "mine: ')
    prof = qkweights.profile(str(MODELS / "vit"), spec_dir=folder)
    spec_file = folder / "hf-vit.toml"
    assert prof.source["spec"] == {
        "family": "hf-vit",
        "file": str(spec_file),
        "sha256": hashlib.sha256(spec_file.read_bytes()).hexdigest(),
        "user": True,
        "replaces": "hf-vit.toml",
    }
    prof.save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "profile.json").read_text())["source"]["spec"]["file"] == str(spec_file)
    shipped = qkweights.profile(str(MODELS / "vit")).source["spec"]
    assert shipped == {
        "family": "hf-vit",
        "file": "hf-vit.toml",
        "sha256": hashlib.sha256((builtin_spec_dir() / "hf-vit.toml").read_bytes()).hexdigest(),
        "user": False,
        "replaces": None,
    }


def test_a_family_in_two_spec_folders_says_which_wins(tmp_path, monkeypatch, capsys):
    first = _user_hf_vit(tmp_path, 'description = "', 'description = "first: ', "first")
    second = _user_hf_vit(tmp_path, 'description = "', 'description = "second: ', "second")
    monkeypatch.setenv(SPEC_PATH_ENV, str(second))
    specs = load_specs(spec_dir=first)  # spec_dir= wins over QKWEIGHTS_SPEC_PATH
    assert specs["hf-vit"].description.startswith("first: ") and specs["hf-vit"].path == first / "hf-vit.toml"
    assert specs["hf-vit"].shadows == (second / "hf-vit.toml",)
    assert main(["specs", "--spec-dir", str(first)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("hf-vit "))
    assert line.endswith(
        f"({first / 'hf-vit.toml'}, replacing the built-in hf-vit.toml; wins over {second / 'hf-vit.toml'})"
    )
    assert main(["inspect", str(MODELS / "vit"), "--spec-dir", str(first)]) == 0
    out = capsys.readouterr().out
    winner = f"{first / 'hf-vit.toml'}, replacing the built-in hf-vit.toml; wins over {second / 'hf-vit.toml'}"
    assert f"spec      {winner}\n" in out
    monkeypatch.delenv(SPEC_PATH_ENV)
    assert load_specs(spec_dir=[second, first])["hf-vit"].description.startswith("second: ")
    assert load_specs(spec_dir=first)["hf-vit"].shadows == ()


def test_a_regular_file_is_refused_as_a_spec_folder(tmp_path, monkeypatch):
    f = tmp_path / "hf-vit.toml"
    f.write_text(HF_VIT)
    with pytest.raises(SpecError) as e:
        load_specs(spec_dir=f)
    assert str(e.value) == (
        f"spec folder {f} (from spec_dir) does not exist or is not a folder; give a folder of .toml spec files"
    )
    monkeypatch.setenv(SPEC_PATH_ENV, str(f))
    with pytest.raises(SpecError, match=f"^spec folder {re.escape(str(f))} \\(from {SPEC_PATH_ENV}\\) does not"):
        load_specs()


@pytest.mark.parametrize("value", ["1", "0"])
def test_an_integer_is_refused_for_a_boolean_field(tmp_path, value):
    folder = _user_hf_vit(tmp_path, "[detect]\n", f"[detect]\nconfig_required = {value}\n")
    with pytest.raises(SpecError) as e:
        load_specs(spec_dir=folder)
    assert str(e.value) == f"{folder / 'hf-vit.toml'}: [detect] config_required is {value}; it must be true or false"
