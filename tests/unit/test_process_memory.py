"""The memory settings a training script gets by default, and that a site's own setting wins."""

from fl.memory import TORCH_HUGE_PAGES, training_memory_env


def test_a_script_gets_huge_pages_for_big_tensors_unless_its_environment_says_otherwise():
    assert training_memory_env({"PATH": "/usr/bin"}) == {TORCH_HUGE_PAGES: "1"}
    assert training_memory_env({TORCH_HUGE_PAGES: "0"}) == {}  # the site's (or the job's) own value stays
