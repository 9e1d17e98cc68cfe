import random

import pytest

from handclip.data.captions import Captioner, caption_fields
from handclip.errors import ConfigError

ROW = {
    "aspect": "dorsal right",
    "person": "0000530",
    "gender": "female",
    "age": "59",
    "skinColor": "fair",
    "accessories": "1",
    "nailPolish": "0",
}


def test_fields_from_an_11k_row():
    fields = caption_fields(ROW)
    assert fields["view"] == "dorsal" and fields["side"] == "right"
    assert fields["accessories"] == "wearing a ring" and fields["nail_polish"] == "with bare nails"


def test_first_template_in_evaluation_random_in_training():
    captioner = Captioner(["the {aspect} hand of person {person}", "a {age} year old {gender}'s {view} hand"])
    assert captioner(ROW) == "the dorsal right hand of person 0000530"
    seen = {captioner(ROW, random.Random(i)) for i in range(20)}
    assert seen == {"the dorsal right hand of person 0000530", "a 59 year old female's dorsal hand"}


def test_unknown_field_and_missing_attribute_are_named():
    with pytest.raises(ConfigError, match="unknown field 'colour'.*allowed fields are aspect"):
        Captioner(["{colour} hand"])
    captioner = Captioner(["a {gender} hand"])
    with pytest.raises(ConfigError, match="needs 'gender', which image a.jpg does not have"):
        captioner.check_rows([{"aspect": "dorsal", "person": "0001", "image": "a.jpg"}])


def test_every_row_is_checked_before_training_not_only_the_first():
    captioner = Captioner(["{caption}"])
    rows = [{"image": "a.jpg", "caption": "a hand"}, {"image": "b.jpg", "caption": "  "}]
    with pytest.raises(ConfigError, match="needs 'caption', which image b.jpg does not have .empty"):
        captioner.check_rows(rows)


def test_a_number_format_on_a_text_field_is_refused_when_the_template_is_read():
    with pytest.raises(ConfigError, match=r"'\{person:05d\}' cannot be filled"):
        Captioner(["{person:05d}"])
