import numpy as np
import pytest
import torch
from PIL import Image

from components.data.samplers import draw_random_pairs
from components.data.transforms import BatchTransform, PairBatchTransform

LABELS = np.array([0] * 5 + [1] * 3 + [2] * 1)


def test_random_pairs_counts_and_labels():
    pairs = draw_random_pairs(LABELS, pos_per_class=4, neg_per_class=6, rng=np.random.default_rng(0))
    i, j, y = pairs.T
    assert (y == 1).sum() == 4 * 2  # class 2 has one image: no positive pair
    assert (y == 0).sum() == 6 * 3
    assert np.all(LABELS[i[y == 1]] == LABELS[j[y == 1]]) and np.all(i[y == 1] != j[y == 1])
    assert np.all(LABELS[i[y == 0]] != LABELS[j[y == 0]])


def test_random_pairs_are_seeded():
    draw = lambda seed: draw_random_pairs(LABELS, 4, 4, np.random.default_rng(seed))
    assert np.array_equal(draw(1), draw(1)) and not np.array_equal(draw(1), draw(2))


def test_random_pairs_need_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        draw_random_pairs(np.zeros(4), 1, 1, np.random.default_rng(0))


def _image(w: int, h: int, value: int = 200) -> Image.Image:
    return Image.new("RGB", (w, h), (value, value, value))


def test_eval_transform_pads_to_square_with_the_mean():
    images, labels = BatchTransform((0.5,) * 3, (0.5,) * 3, (32, 32))([(_image(64, 32), 3)])
    assert images.shape == (1, 3, 32, 32) and labels.tolist() == [3]
    # longer side resized to 32 → 32×16 content centred, 8 padded rows above and below at 0 (= the mean)
    assert torch.all(images[0, :, :8] == 0) and torch.all(images[0, :, 24:] == 0)
    assert torch.allclose(images[0, :, 8:24], torch.full((3, 16, 32), (200 / 255 - 0.5) / 0.5), atol=1e-2)


def test_eval_tensor_does_not_depend_on_the_batch():
    t = BatchTransform((0.5,) * 3, (0.5,) * 3, (40, 40))
    alone, _ = t([(_image(50, 30), 0)])
    mixed, _ = t([(_image(20, 90, 10), 0), (_image(50, 30), 0)])
    assert torch.equal(alone[0], mixed[1])


def test_training_sizes_vary_within_the_range_per_batch():
    t = BatchTransform((0.5,) * 3, (0.5,) * 3, (32, 48), hflip=True, seed=0)
    sides = {t([(_image(60, 40), 0)] * 2)[0].shape[-1] for _ in range(30)}
    assert len(sides) > 3 and min(sides) >= 32 and max(sides) <= 48


def test_pair_transform_stacks_firsts_then_seconds():
    t = PairBatchTransform((0.5,) * 3, (0.5,) * 3, (16, 16))
    images, y, i, j = t([(_image(16, 16, 0), _image(16, 16, 255), 1, 0, 1), (_image(16, 16, 0), _image(16, 16, 255), 0, 2, 3)])
    assert images.shape == (4, 3, 16, 16) and y.tolist() == [1, 0] and i.tolist() == [0, 2] and j.tolist() == [1, 3]
    assert images[:2].mean() < 0 < images[2:].mean()


def _half_image(w: int = 24, h: int = 24) -> Image.Image:
    img = _image(w, h, 40)
    img.paste((220, 120, 60), (0, 0, w // 2, h))
    return img


@pytest.mark.parametrize("options", [{"rotation_degrees": 10.0}, {"color_jitter": 0.4}])
def test_training_augmentation_changes_tensors(options):
    plain = BatchTransform((0.5,) * 3, (0.5,) * 3, (24, 24))([(_half_image(), 0)])[0]
    torch.manual_seed(0)
    t = BatchTransform((0.5,) * 3, (0.5,) * 3, (24, 24), **options)
    draws = [t([(_half_image(), 0)])[0] for _ in range(3)]
    assert all(d.shape == plain.shape for d in draws)
    assert all(not torch.equal(d, plain) for d in draws) and not torch.equal(draws[0], draws[1])


def test_augmentation_defaults_and_eval_are_unchanged():
    meta = {"mean": [0.5] * 3, "std": [0.5] * 3, "image_size": 24}
    t = BatchTransform.for_eval(meta)
    assert t.rotate is None and t.jitter is None and t.flip is None
    plain = BatchTransform((0.5,) * 3, (0.5,) * 3, (24, 24))([(_half_image(), 0)])[0]
    assert torch.equal(t([(_half_image(), 0)])[0], plain)
    pair = PairBatchTransform((0.5,) * 3, (0.5,) * 3, (24, 24), rotation_degrees=5.0, color_jitter=0.2)
    assert pair.rotate is not None and pair.jitter is not None
    with pytest.raises(ValueError, match="must be >= 0"):
        BatchTransform((0.5,) * 3, (0.5,) * 3, (24, 24), rotation_degrees=-1.0)
