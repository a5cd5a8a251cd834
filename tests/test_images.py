import numpy as np
import pytest
from PIL import Image

from pipeline.errors import InputError
from pipeline.images import load_image
from scripts import sample_images as images

LIMITS = {"max_pixels": 50_000_000, "max_side": 1024, "max_bytes": 20_000_000}


def load(data, tmp_path, name="upload.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return load_image(str(path), **LIMITS)


@pytest.mark.parametrize("maker, name, message", [
    (images.truncated_jpeg, "cut.jpg", "truncated or corrupt"),
    (lambda: np.random.default_rng(0).bytes(5000), "noise.png", "not an image"),
    (lambda: b"", "empty.png", "empty"),
    (lambda: images.png_header_claiming(20000, 20000), "bomb.png", "too many pixels|too large"),
    (lambda: images.png_header_claiming(9000, 9000), "big.png", "too large"),
    (lambda: b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "drawing.svg", "SVG"),
])
def test_unusable_files_get_a_clear_message(tmp_path, maker, name, message):
    with pytest.raises(InputError, match=message):
        load(maker(), tmp_path, name)


def test_files_over_the_byte_limit_are_refused_before_decoding(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"0" * 2048)
    with pytest.raises(InputError, match="limit"):
        load_image(str(path), max_pixels=10**8, max_side=512, max_bytes=1024)


@pytest.mark.parametrize("maker", [images.sixteen_bit_png, images.cmyk_jpeg, images.palette_png_with_transparency,
                                   images.grayscale_png, images.rgba_png])
def test_unusual_modes_become_rgb(tmp_path, maker):
    loaded = load(maker(), tmp_path)
    assert loaded.image.mode == "RGB" and min(loaded.image.size) > 0


def test_sixteen_bit_keeps_its_range(tmp_path):
    array = np.asarray(load(images.sixteen_bit_png(), tmp_path).image)
    assert array.min() < 10 and array.max() > 245


def test_transparent_pixels_are_flattened_on_white(tmp_path):
    array = np.asarray(load(images.rgba_png(), tmp_path).image)
    assert array.min() == 255


def test_animated_gif_uses_the_first_frame(tmp_path):
    loaded = load(images.animated_gif(), tmp_path, "anim.gif")
    assert tuple(np.asarray(loaded.image)[0, 0]) == (255, 0, 0)
    assert any("first frame" in note for note in loaded.notes)


def test_exif_rotation_is_applied(tmp_path):
    loaded = load(images.exif_rotated_jpeg(), tmp_path, "rotated.jpg")
    assert loaded.image.size == (100, 200)
    top = np.asarray(loaded.image)[5, 50]
    assert top[2] > 150 and top[0] < 100  # the blue half is on top once upright


def test_huge_legal_photos_are_downscaled_not_refused(tmp_path):
    loaded = load(images.huge_legal_jpeg(), tmp_path, "big.jpg")
    assert max(loaded.image.size) == 1024 and loaded.original_size == (4000, 3000)
    assert any("downscaled" in note for note in loaded.notes)


def test_one_pixel_and_in_memory_sources(tmp_path):
    assert load(images.encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), tmp_path).image.size == (1, 1)
    assert load_image(Image.new("L", (5, 4)), **LIMITS).image.mode == "RGB"
    assert load_image(np.zeros((4, 6, 3), dtype=np.uint8), **LIMITS).image.size == (6, 4)
    with pytest.raises(InputError):
        load_image(None, **LIMITS)


def test_same_pixels_same_digest(tmp_path):
    a = load(images.encoded(images.photo(), "PNG"), tmp_path, "a.png")
    b = load_image(images.photo(), **LIMITS)
    c = load_image(images.photo(seed=1), **LIMITS)
    assert a.digest == b.digest != c.digest


@pytest.mark.parametrize("fmt, name", [("BMP", "x.bmp"), ("TIFF", "x.tif"), ("ICO", "x.png"), ("PPM", "x.jpg")])
def test_only_the_photo_formats_are_decoded(tmp_path, fmt, name):
    """Pillow can read these, but no camera, phone or browser sends them: their decoders stay closed."""
    data = images.encoded(images.photo(64, 48), fmt)
    with pytest.raises(InputError, match="JPEG, PNG, WebP or GIF"):
        load(data, tmp_path, name)


def test_a_large_sixteen_bit_png_is_reduced_before_any_float_copy(tmp_path):
    """A ~100 KB 16-bit PNG of tens of megapixels used to go through three float64 copies of every pixel (about
    1.2 GB at 50 MP); now it is reduced in PIL first and only the small picture becomes floats."""
    import tracemalloc

    width, height = 6000, 4000
    ramp = (np.linspace(0, 65535, width, dtype=np.float64)[None, :] * np.ones((height, 1))).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    del ramp
    tracemalloc.start()
    try:
        loaded = load_image(str(path), **LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    array = np.asarray(loaded.image)
    assert loaded.original_size == (width, height) and max(loaded.image.size) == LIMITS["max_side"]
    assert array[:, :5].mean() < 10 and array[:, -5:].mean() > 245  # the range survives the reduction
    # Pillow's PNG decoder holds the raw 16-bit rows (2 bytes a pixel); the float64 path added 24 bytes a pixel
    assert peak < 3 * width * height, peak


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_stays_upright(tmp_path):
    big = images.photo(4000, 3000, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to view
    path = tmp_path / "sideways.jpg"
    big.save(path, "JPEG", exif=exif.tobytes(), quality=80)
    loaded = load_image(str(path), **LIMITS)
    assert loaded.image.size == (768, 1024) and loaded.original_size == (4000, 3000)
