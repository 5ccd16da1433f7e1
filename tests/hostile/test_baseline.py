"""The hostile-client harness itself: a fresh backend serves everyone and stays at its
baseline across ordinary clients that come and go."""

from tests.fakes.served import ServedBackend


async def test_a_fresh_backend_serves_every_socket_and_keeps_its_baseline(tmp_path):
    async with ServedBackend.start(tmp_path) as served:
        await served.assert_serving()
        baseline = served.resources()
        for _ in range(3):
            await served.assert_serving()
        await served.assert_back_to(baseline)
