import pytest
import torch
from PIL import Image

from handclip.data.transforms import check_augment, eval_transform, train_transform
from handclip.errors import ConfigError


def test_eval_transform_matches_clip_processor():
    from transformers import CLIPImageProcessor

    image = Image.new("RGB", (160, 120), (200, 120, 40))
    for x in range(0, 160, 7):
        for y in range(0, 120, 5):
            image.putpixel((x, y), (x, y, 255 - x))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ours = eval_transform(32, 32, processor.image_mean, processor.image_std)(image)
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 32, 32)
    # same geometry and normalisation; resampling kernels differ slightly between libraries
    assert (ours - theirs).abs().mean() < 0.1


def test_horizontal_flip_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="turns a right hand into a left one"):
        check_augment({"hflip": True})


def test_train_transform_output_shape_and_range():
    image = Image.new("RGB", (160, 120), (10, 200, 90))
    torch.manual_seed(0)  # the jitter is random: the same draw whatever ran before in this process
    out = train_transform(32, 36, [0.5] * 3, [0.5] * 3, {"crop_scale": [0.6, 1.0], "rotation": 5, "color_jitter": 0.2})(
        image
    )
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # normalised with mean 0.5 and std 0.5: pixel values 0..1 land in -1..1, and the colour survives
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6
    green, red = out[1].mean().item(), out[0].mean().item()
    # (10, 200, 90) is mostly green; brightness, contrast and saturation jitter of 0.2 at their worst (0.8 each) leave
    # green near 0.2 and red near -0.7 (it failed at green > 0.3 on an unlucky draw: 0.25)
    assert green > 0.1 and red < -0.5 and green - red > 0.8


@pytest.mark.parametrize(
    ("augment", "message"),
    [
        ({"crop_scale": ["a", "b"]}, r"data.augment.crop_scale=\['a', 'b'\] must be \[low, high\]"),
        ({"crop_scale": [0.9, 0.5]}, "must be .low, high. with 0 < low <= high <= 1"),
        ({"rotation": "abc"}, "data.augment.rotation='abc' must be a number from 0 to 180"),
        ({"color_jitter": 2}, "data.augment.color_jitter=2 must be a number from 0 to 1"),
        ({"blur": 1}, "data.augment.blur is unknown"),
    ],
)
def test_bad_augmentation_settings_are_named(augment, message):
    with pytest.raises(ConfigError, match=message):
        check_augment(augment)
