"""The spec of a synthetic cache, as the tests that write caches by hand describe them."""

from vfs.cache import CacheSpec
from vfs.data import DataSpec
from vfs.models import Preprocess


def synthetic_spec(
    grid: tuple[int, int],
    channels: int,
    input_size: int = 32,
    source: str = "x",
    label_col: str | None = None,
    domain_col: str | None = None,
    model: str = "embedded:efficientnet_lite0",
    layer: str = "blocks.5",
) -> CacheSpec:
    return CacheSpec(
        model=model,
        layer=layer,
        input_size=input_size,
        grid=grid,
        channels=channels,
        preprocess=Preprocess(input_size, input_size),
        data=DataSpec(source, label_col, domain_col),
    )
