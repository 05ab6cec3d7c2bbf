# mindspore first: importing decord before it aborts the process.
import mindspore  # noqa: F401
