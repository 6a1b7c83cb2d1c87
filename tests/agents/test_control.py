from agents import control


def test_a_stop_reaches_the_running_attempt_even_after_a_duplicate_delivery_ended():
    with control.tracking(7, 2) as running:
        with control.tracking(7, 2):  # a duplicate message, fenced off, ends at once
            pass
        assert not control.request_stop(7, 1)  # another attempt: nothing stops
        assert not running.is_set()
        assert control.request_stop(7, 2)
        assert running.is_set()
    assert not control.request_stop(7, 2)  # gone once the real run ends
