"""A folder of the user's images: metadata.jsonl and .txt captions, resize + center crop against torch's
antialiased bilinear resize (the twin of PIL's), and one clear error for each kind of bad folder."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from npdiffusion.data.folder import FolderDataset, resize_center_crop


def write_image(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def smooth_image(h, w, seed=0):
    """A smooth RGB image (low-frequency sines) so resampling differences stay within rounding."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(seed)
    chans = [127.5 + 120 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * yy + rng.uniform(0.5, 2) * xx) + rng.uniform(0, 6))
             for _ in range(3)]
    return np.stack(chans, axis=-1).round().astype(np.uint8)


def test_metadata_jsonl_captions_in_sorted_order_with_subfolders(tmp_path):
    write_image(str(tmp_path / "b.png"), smooth_image(20, 20))
    write_image(str(tmp_path / "a.jpg"), smooth_image(20, 30))
    write_image(str(tmp_path / "sub" / "c.png"), smooth_image(40, 20))
    lines = [{"file_name": "b.png", "text": "a bee"}, {"file_name": "sub/c.png", "text": "a cat", "extra": 1},
             {"file_name": "a.jpg", "text": "an ant"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = FolderDataset(tmp_path, size=16)
    assert ds.files == ["a.jpg", "b.png", "sub/c.png"]
    assert ds.captions == ["an ant", "a bee", "a cat"]
    images = ds.get_images([2, 0])
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8


def test_txt_captions_beside_each_image(tmp_path):
    write_image(str(tmp_path / "x.png"), smooth_image(16, 16))
    write_image(str(tmp_path / "y.webp"), smooth_image(16, 16))
    (tmp_path / "x.txt").write_text("  an x\n")
    (tmp_path / "y.txt").write_text("a y")
    ds = FolderDataset(tmp_path, size=16)
    assert ds.captions == ["an x", "a y"] and len(ds) == 2
    assert np.array_equal(ds.get_images([0])[0], smooth_image(16, 16))          # already 16x16: untouched


@pytest.mark.parametrize("h,w,size", [(32, 48, 16), (48, 32, 16), (37, 23, 16), (23, 64, 12), (40, 41, 20)])
def test_resize_and_center_crop_match_torch_antialiased_bilinear(tmp_path, h, w, size):
    src = smooth_image(h, w, seed=h * w)
    out = np.asarray(resize_center_crop(Image.fromarray(src), size))
    # torchvision's Resize(size) + CenterCrop(size), spelled out with torch ops:
    new_h, new_w = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
    t = torch.tensor(src, dtype=torch.float64).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False,
                                              antialias=True)[0].permute(1, 2, 0).numpy()
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    expected = np.clip(np.rint(resized[top:top + size, left:left + size]), 0, 255)
    assert out.shape == (size, size, 3)
    assert np.abs(out.astype(np.float64) - expected).max() <= 2           # PIL works in 8-bit fixed point
    assert np.abs(out.astype(np.float64) - expected).mean() < 0.6


def test_grayscale_palette_and_alpha_images_become_rgb(tmp_path):
    Image.fromarray(np.full((16, 16), 200, np.uint8), mode="L").save(tmp_path / "g.png")
    Image.fromarray(np.zeros((16, 16, 4), np.uint8) + 90, mode="RGBA").save(tmp_path / "a.png")
    Image.fromarray(smooth_image(16, 16)).convert("P").save(tmp_path / "p.png")
    for n in ("g", "a", "p"):
        (tmp_path / f"{n}.txt").write_text(n)
    images = FolderDataset(tmp_path, size=16).get_images([0, 1, 2])
    assert images.shape == (3, 16, 16, 3)
    assert (images[1] == 200).all() and (images[0] == 90).all()              # a.png, g.png in sorted order


# ------------------------------------------------------------------------------ bad folders
def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder .*nope.* does not exist"):
        FolderDataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="no path given"):
        FolderDataset("")


def test_a_file_instead_of_a_folder(tmp_path):
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        FolderDataset(tmp_path / "f.png")


def test_empty_folder_and_folder_without_images(tmp_path):
    with pytest.raises(ValueError, match="holds no images"):
        FolderDataset(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".hidden.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds no images \(looked for .png .jpg"):
        FolderDataset(tmp_path)


def test_images_without_txt_captions_are_listed(tmp_path):
    for i in range(8):
        write_image(str(tmp_path / f"im{i}.png"), smooth_image(8, 8))
    (tmp_path / "im3.txt").write_text("three")
    with pytest.raises(ValueError) as info:
        FolderDataset(tmp_path, size=8)
    msg = str(info.value)
    assert "7 of 8 images have no caption: im0.png, im1.png, im2.png, im4.png, im5.png and 2 more" in msg
    assert ".txt file" in msg and "\n" not in msg


def test_images_missing_from_metadata_are_listed(tmp_path):
    for n in ("a", "b"):
        write_image(str(tmp_path / f"{n}.png"), smooth_image(8, 8))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"1 of 2 images have no caption: b.png \(add them to metadata.jsonl"):
        FolderDataset(tmp_path, size=8)


@pytest.mark.parametrize("line,match", [
    ("{not json", r"metadata.jsonl, line 2 is not valid JSON"),
    ('["a.png", "x"]', r"line 2 must be a JSON object with 'file_name' and 'text', got a JSON list"),
    ('{"text": "x"}', r"line 2 needs a 'file_name' string, got None"),
    ('{"file_name": "b.png"}', r"line 2 needs a 'text' string \(the caption\) for 'b.png', got None"),
    ('{"file_name": "b.png", "text": 3}', r"needs a 'text' string .* got 3"),
    ('{"file_name": "../b.png", "text": "x"}', r"file_name '../b.png' must be a path inside the folder"),
    ('{"file_name": "a.png", "text": "again"}', r"'a.png' is listed twice"),
    ('{"file_name": "zzz.png", "text": "x"}', r"names 1 image\(s\) that are not in the folder: zzz.png"),
])
def test_malformed_metadata(tmp_path, line, match):
    for n in ("a", "b"):
        write_image(str(tmp_path / f"{n}.png"), smooth_image(8, 8))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a"}) + "\n" + line + "\n")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        FolderDataset(tmp_path, size=8)


def test_unreadable_image_fails_at_construction(tmp_path):
    write_image(str(tmp_path / "good.png"), smooth_image(8, 8))
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    for n in ("good", "bad"):
        (tmp_path / f"{n}.txt").write_text(n)
    with pytest.raises(ValueError, match="'bad.png' is not a readable image"):
        FolderDataset(tmp_path, size=8)
