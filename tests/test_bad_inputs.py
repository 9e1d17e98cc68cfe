"""Bad input and faults: each ends in a message that names the problem, and nothing is lost."""

import csv
import errno
import json
import os
import pickle
import shutil

import lightning as L
import pytest
import torch
from PIL import Image

from handclip.data.images import build_cache, load_rgb
from handclip.data.prepare import PrepareSettings, prepare, read_manifest
from handclip.data.readers import read_11k
from handclip.data.sampling import IdentityBalancedBatchSampler
from handclip.data.sources import Hands11k
from handclip.data.split import split_11k
from handclip.errors import ConfigError, DataError, HandClipError
from handclip.io import load_checkpoint_file, save_atomic
from handclip.train.rundir import RunDirError, RunLock, resolve_resume

HEADER = "id,age,gender,skinColor,accessories,nailPolish,aspectOfHand,imageName,irregularities"


@pytest.fixture
def hands(tmp_path, synthetic_hands):
    """A private, editable copy of the synthetic 11k folder."""
    root = tmp_path / "hands"
    shutil.copytree(synthetic_hands, root, ignore=shutil.ignore_patterns("cache", "splits"))
    return root


def rows_of(root):
    with open(root / "HandInfo.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(root, rows, columns=None):
    columns = columns or list(rows[0])
    with open(root / "HandInfo.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# --- data -----------------------------------------------------------------------------------


def test_missing_handinfo_names_the_file_and_the_demo(tmp_path):
    with pytest.raises(DataError, match=r"HandInfo.csv not found.*experiment=demo"):
        read_11k(tmp_path)


def test_unreadable_handinfo(hands):
    (hands / "HandInfo.csv").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="HandInfo.csv"):
        read_11k(hands)


def test_missing_column_is_named(hands):
    rows = rows_of(hands)
    write_rows(hands, rows, [c for c in rows[0] if c != "aspectOfHand"])
    with pytest.raises(DataError, match="column 'aspectOfHand' is missing"):
        read_11k(hands)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("id", "12a", "line 4: id '12a' is not a number"),
     ("aspectOfHand", "dorsal", "line 4: aspectOfHand 'dorsal' is not one of"),
     ("accessories", "yes", "line 4: accessories 'yes' must be 0 or 1")],
)  # fmt: skip
def test_malformed_rows_are_named(hands, field, value, message):
    rows = rows_of(hands)
    rows[2][field] = value
    write_rows(hands, rows)
    with pytest.raises(DataError, match=message):
        read_11k(hands)


def test_missing_zero_byte_and_truncated_images_are_skipped_and_counted(hands):
    rows = rows_of(hands)
    names = [r["imageName"] for r in rows if r["accessories"] == "0"]
    (hands / "Hands" / names[0]).unlink()
    (hands / "Hands" / names[1]).write_bytes(b"")
    data = (hands / "Hands" / names[2]).read_bytes()
    (hands / "Hands" / names[2]).write_bytes(data[: len(data) // 3])
    with pytest.warns(UserWarning, match="skipping bad image"):
        path = prepare(PrepareSettings(Hands11k(root=str(hands), aspect=rows[0]["aspectOfHand"]), cache_size=40),
                       quiet=True)  # fmt: skip

    info = json.loads(path.with_suffix(".json").read_text())
    bad = {f"Hands/{n}" for n in names[:3]}
    assert bad <= set(info["bad_images"])
    assert not bad & {r["image"] for r in read_manifest(path)}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_is_skipped_and_counted_like_any_bad_image(hands, monkeypatch):
    rows = rows_of(hands)
    names = [r["imageName"] for r in rows if r["accessories"] == "0"]
    # Pillow refuses images over 2 x MAX_IMAGE_PIXELS; the 160x120 hands stay under it, this one does not
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 9_700)
    Image.new("RGB", (200, 200), (200, 150, 120)).save(hands / "Hands" / names[0], "JPEG")
    with pytest.warns(UserWarning, match="skipping bad image"):
        path = prepare(PrepareSettings(Hands11k(root=str(hands), aspect=rows[0]["aspectOfHand"]), cache_size=40),
                       quiet=True)  # fmt: skip
    info = json.loads(path.with_suffix(".json").read_text())
    assert f"Hands/{names[0]}" in info["bad_images"]
    assert f"Hands/{names[0]}" not in {r["image"] for r in read_manifest(path)}


def test_bad_image_with_fail_policy_stops_at_once(hands):
    name = rows_of(hands)[0]["imageName"]
    (hands / "Hands" / name).write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=rf"{name}: cannot be decoded.*on_bad_image=fail"):
        build_cache(hands, [f"Hands/{name}"], 40, hands.parent / "derived", on_bad_image="fail")


def test_a_dataset_where_most_images_fail_is_an_error(hands):
    for path in list((hands / "Hands").glob("*.jpg"))[5:]:
        path.unlink()
    with pytest.raises(DataError, match="are missing or unreadable.*looks incomplete"), pytest.warns(UserWarning):
        prepare(PrepareSettings(Hands11k(root=str(hands)), cache_size=40), quiet=True)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_odd_image_modes_become_rgb(tmp_path, mode):
    image = Image.new("RGBA", (20, 10), (255, 0, 0, 0)).convert(mode) if mode != "I;16" else Image.new("I;16", (20, 10))
    path = tmp_path / f"x.{'tif' if mode in ('I;16', 'CMYK') else 'png'}"
    image.save(path)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == (20, 10)
    if mode == "RGBA":  # transparent pixels land on white, not black
        assert loaded.getpixel((0, 0)) == (255, 255, 255)


def test_an_aspect_with_no_identities_left_is_named(hands):
    rows = [r for r in rows_of(hands) if r["aspectOfHand"] != "palmar left"]
    write_rows(hands, rows)
    with pytest.raises(DataError, match="aspect 'palmar left' has 0 training and 0 test identities"):
        split_11k(read_11k(hands), "palmar left")


def test_a_test_identity_with_a_single_image_is_gallery_only(hands):
    rows = rows_of(hands)
    test_person = max(int(r["id"]) for r in rows)
    keep, seen = [], False
    for row in rows:
        if int(row["id"]) == test_person and row["aspectOfHand"] == "dorsal right":
            if seen:
                continue
            seen = True
        keep.append(row)
    write_rows(hands, keep)
    with pytest.warns(UserWarning, match="single image.*only be gallery images"):
        split = split_11k(read_11k(hands, no_accessories=False), "dorsal right")
    identity = f"dorsal_right/{test_person:07d}"
    splits = {r["split"] for r in split if r["identity"] == identity}
    assert splits == {f"gallery{i}" for i in range(10)} | {f"gallery_all{i}" for i in range(10)}


def test_manifest_paths_outside_the_root_are_refused(tmp_path):
    (tmp_path / "m.csv").write_text("image,identity,person,aspect,split\n../../etc/passwd,a,1,x,train\n")
    with pytest.raises(DataError, match="points outside the dataset root"):
        read_manifest(tmp_path / "m.csv")


# --- configuration --------------------------------------------------------------------------


def test_identity_balanced_sampler_that_cannot_be_filled():
    with pytest.raises(ConfigError, match=r"identities_per_batch=8 cannot be filled.*only 3 identities"):
        IdentityBalancedBatchSampler([0, 0, 1, 1, 2, 2], identities_per_batch=8, images_per_identity=2)
    batches = list(IdentityBalancedBatchSampler([0, 0, 1, 1, 2, 2, 3], 2, 2, seed=0))
    assert all(len(b) == 4 and len({i for _, i in b}) >= 2 for b in batches)


# --- numerics -------------------------------------------------------------------------------


def test_nan_loss_stops_with_step_lr_and_scale_and_keeps_the_good_checkpoint(tmp_path, synthetic_hands):
    from handclip.model import Full, apply_freeze, load_backbone
    from handclip.train.callbacks import AtomicCheckpointIO
    from handclip.train.module import NonFiniteLossError
    from tests.conftest import TINY
    from tests.test_module import datamodule_for, fine_tuner

    backbone = load_backbone(TINY, tmp_path)
    apply_freeze(backbone, Full())
    datamodule = datamodule_for(synthetic_hands, backbone)
    module = fine_tuner(backbone, datamodule, lr=1e-3)

    class Poison(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:  # after one good epoch and its checkpoint
                with torch.no_grad():
                    pl_module.backbone.model.visual_projection.weight.fill_(float("nan"))

    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        callbacks=[checkpoints, Poison()],
        plugins=[AtomicCheckpointIO()],
    )
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step \d+ \(epoch 1\); last lr .*logit_scale"):
        trainer.fit(module, datamodule=datamodule)
    saved = load_checkpoint_file(tmp_path / "ckpt" / "last.ckpt")
    assert saved["epoch"] == 0 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())


# --- storage and processes ------------------------------------------------------------------


def test_no_space_left_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_atomic({"step": 1}, path)
    before = path.read_bytes()

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    full = r"No space left on device \(is the disk full\?.*\)\. The previous checkpoint there, if any, is intact"
    with pytest.raises(HandClipError, match=full):
        save_atomic({"step": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path):
    with RunLock(tmp_path):
        pid = os.fork()
        if pid == 0:  # the child is the second process
            try:
                with RunLock(tmp_path):
                    os._exit(0)
            except RunDirError as error:
                os._exit(3 if "in use by another process" in str(error) else 4)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 3
    with RunLock(tmp_path):  # released: usable again
        pass


def test_resume_without_any_checkpoint_says_so(tmp_path):
    with pytest.raises(RunDirError, match="has no checkpoint to resume"):
        resolve_resume(tmp_path, "last")
    with pytest.raises(RunDirError, match="no such checkpoint file"):
        resolve_resume(tmp_path, str(tmp_path / "nope.ckpt"))


# --- untrusted files ------------------------------------------------------------------------


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.ckpt", "wb") as handle:
        pickle.dump({"state_dict": Exploit()}, handle)
    with pytest.raises(HandClipError, match="evil.ckpt was refused: .*could run code"):
        load_checkpoint_file(tmp_path / "evil.ckpt")
    assert not (tmp_path / "pwned").exists()


def test_a_text_file_given_as_a_checkpoint_is_called_what_it_is(tmp_path):
    (tmp_path / "notes.ckpt").write_text("these are my notes")
    with pytest.raises(HandClipError, match="notes.ckpt is damaged or not a checkpoint .not a complete zip archive"):
        load_checkpoint_file(tmp_path / "notes.ckpt")


def test_no_trust_remote_code_anywhere():
    from pathlib import Path

    sources = (Path(__file__).resolve().parents[1] / "handclip").rglob("*.py")
    assert not [p for p in sources if "trust_remote_code=True" in p.read_text()]


# --- what the command line shows ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "first_line"),
    [
        (["freeze.vision_blocks=9"], "error: freeze.vision_blocks=9 is out of range: the backbone's vision"),
        (["backbone=local"], "error: backbone.source has no value"),
        (["data.batch_size=1"], "error: data.batch_size=1 is too small"),
        (["data.sampler=identity_balanced", "data.identities_per_batch=64", "data.images_per_identity=2",
          "data.batch_size=128"], "error: data.identities_per_batch=64 cannot be filled"),
    ],
)  # fmt: skip
def test_command_line_config_errors_are_one_line_with_the_key(tmp_path, overrides, first_line):
    from tests.test_train import QUICK, train

    base = [q for q in QUICK if not q.startswith("data.batch_size")]
    if "backbone=local" in overrides:  # the tiny backbone's settings do not apply to a local one
        base = [q for q in base if not q.startswith("backbone.")]
    result = train(tmp_path, *overrides, check=False, base=base)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines and lines[0].startswith(first_line), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "runs").rglob("*.ckpt"))
