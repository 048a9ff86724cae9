"""adapters/notices.py: an engine warning goes to the caller that collects it (a node, every time), else to
`warnings.warn` (CLI, scripts); each thread collects its own."""

import threading
import warnings

import pytest
from sa3_lora_studio.adapters import notices


def test_without_a_collector_a_notice_is_a_python_warning_pointing_at_the_callers_caller():
    def engine_check():
        notices.warn("the source is cut", stacklevel=2)

    with pytest.warns(UserWarning, match="the source is cut") as caught:
        engine_check()
    assert caught[0].filename == __file__  # the line that called engine_check, as warnings.warn's stacklevel


def test_a_collector_takes_every_notice_of_its_thread_and_none_of_another():
    background = []

    def background_run():  # e.g. a training run's demo in ComfyUI while a generation node runs
        with warnings.catch_warnings(record=True) as caught:  # (the main thread waits: no race on the filters)
            warnings.simplefilter("always")
            notices.warn("from the background run")
        background.extend(str(w.message) for w in caught)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a collected notice is not also a warning
        with notices.collected() as found:
            notices.warn("first")
            thread = threading.Thread(target=background_run)
            thread.start()
            thread.join()
            notices.warn("first")  # said again: kept again (the node shows each distinct one once)
            with notices.collected() as inner:  # a nested call collects its own
                notices.warn("inner")
    assert background == ["from the background run"]  # a warning there, not in this thread's list
    assert found == ["first", "first"] and inner == ["inner"]
    with pytest.warns(UserWarning, match="after"):  # the collector is gone after its block
        notices.warn("after")
