"""Transport-independent virtio feature bits and device status bits (virtio 1.x)."""

F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128


def bit(n: int) -> int:
    """The mask of feature bit ``n``."""
    return 1 << n
