"""The one registry every seam keeps its variants in: a name registered once, one-line errors naming the known ones."""
import pytest

from scalegen.data.registry import DATA_SOURCES
from scalegen.diffusion.objectives import OBJECTIVES, objective_class
from scalegen.errors import UserError
from scalegen.models.token_heads import TOKEN_HEADS
from scalegen.registry import Registry
from scalegen.runs.checkpoints import CHECKPOINT_FORMATS
from scalegen.runs.one_file import OneFileFormat
from scalegen.runs.sharded import ShardedFormat
from scalegen.tokenizers.codec import TOKENIZER_KINDS, registered_kind


def test_every_seam_keeps_its_variants_in_the_one_registry():
    for registry in (OBJECTIVES, TOKENIZER_KINDS, DATA_SOURCES, CHECKPOINT_FORMATS, TOKEN_HEADS):
        assert isinstance(registry, Registry)
    assert list(OBJECTIVES) == ["ddpm", "flow", "meanflow"]  # registration order is kept
    assert CHECKPOINT_FORMATS.chosen("one-file") is OneFileFormat
    assert CHECKPOINT_FORMATS.chosen("sharded") is ShardedFormat


def test_a_name_is_registered_once_and_the_same_entry_again_changes_nothing():
    registry: Registry[int] = Registry("toy")
    assert registry.register("a", 1) == 1
    assert registry.register("a", 1) == 1 and dict(registry) == {"a": 1}
    with pytest.raises(ValueError, match="a toy named 'a' is registered already"):
        registry.register("a", 2)
    assert registry.chosen("a") == 1


def test_an_unknown_name_is_a_one_line_error_listing_the_known_ones():
    with pytest.raises(UserError) as error:
        objective_class("sit")
    assert str(error.value) == "unknown objective 'sit': use one of ddpm, flow, meanflow"
    with pytest.raises(UserError) as error:
        registered_kind("magic")
    message = str(error.value)
    assert "\n" not in message and message.startswith("unknown tokenizer kind 'magic': use one of vqvae")
    assert message.endswith("; load it with the scalegen version that trained it")
