"""The torch-free tables the command line's parsers read agree with the registries and classes that use them: the
objectives' names, summaries and samplers, and each training task's recipe."""
from __future__ import annotations

import pytest

from scalegen.cli.options import TASKS, task_class
from scalegen.diffusion.names import OBJECTIVE_ENTRIES, OBJECTIVE_NAMES, SAMPLERS
from scalegen.diffusion.objectives import OBJECTIVES
from scalegen.train.settings import RECIPE_NOTES, RECIPES


def test_the_objective_registry_holds_the_light_table_s_objectives_with_their_summaries_and_samplers():
    assert tuple(OBJECTIVES) == OBJECTIVE_NAMES
    for name, objective in OBJECTIVES.items():
        assert objective.name == name
        assert objective.summary == OBJECTIVE_ENTRIES[name].summary
        assert objective.samplers == OBJECTIVE_ENTRIES[name].samplers
    assert set(SAMPLERS) == {sampler for objective in OBJECTIVES.values() for sampler in objective.samplers}


@pytest.mark.parametrize("task", TASKS)
def test_each_training_task_trains_with_the_recipe_its_parser_shows(task):
    cls = task_class(task)
    assert cls.kind == task
    assert cls.recipe == RECIPES[task]
    assert cls.recipe_notes == RECIPE_NOTES.get(task, {})
    assert set(TASKS) == set(RECIPES)
