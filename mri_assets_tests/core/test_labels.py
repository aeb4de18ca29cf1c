import pytest

from mri_assets.core.labels import ClassSpec, resolve_label

CLASSES = ClassSpec()


@pytest.mark.parametrize(
    ("key", "label"),
    [
        ("Glioma T2/0001.jpg", "glioma"),
        ("meningioma (12).jpeg", "meningioma"),
        ("MENINGIOMA/x/y/scan.png", "meningioma"),
        ("batch-3/glioma_tumor/img.png", "glioma"),
        ("glioma/meningioma (3).jpg", "glioma"),  # a class folder beats the file name
        ("meningioma/Glioma T2/1.png", "glioma"),  # the nearest folder wins
        ("misc/Glioma 4.png", "glioma"),  # no class folder: the file name decides
        ("pituitary/1.png", None),
        ("notes.txt", None),
        ("", None),
    ],
)
def test_resolve_label(key, label):
    assert resolve_label(key, CLASSES) == label


def test_leading_word_must_be_a_class_not_a_prefix():
    assert resolve_label("gliomas_extra/1.png", CLASSES) is None
    assert resolve_label("my glioma/1.png", CLASSES) is None


def test_custom_classes_and_errors():
    spec = ClassSpec.parse("cat,dog", "cat")
    assert spec.names == ("cat", "dog") and spec.positive_index == 0
    assert resolve_label("Dog 1/a.png", spec) == "dog"
    with pytest.raises(ValueError, match="MRI_POSITIVE_CLASS"):
        ClassSpec.parse("cat,dog", "bird")
    with pytest.raises(ValueError, match="exactly two"):
        ClassSpec.parse("cat", None)
