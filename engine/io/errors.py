"""The one exception type for bad input files, with a one-line message naming file, array and problem."""
from __future__ import annotations


class InputError(ValueError):
    """A file, dataset or array that the engine refuses, e.g. `case.h5: kspace: must be complex, got float32`.

    Attributes:
        source: the file or store path (as given).
        dataset: the dataset / array inside it, or None when the problem concerns the whole file.
        problem: what is wrong, one line.
    """

    def __init__(self, source: object, problem: str, dataset: str | None = None):
        self.source = str(source)
        self.problem = problem
        self.dataset = dataset
        # args carry the constructor's arguments so the error pickles across processes (spawned ranks).
        super().__init__(self.source, problem, dataset)

    def __str__(self) -> str:
        where = self.source if self.dataset is None else f"{self.source}: {self.dataset}"
        return f"{where}: {self.problem}".replace("\n", " ")
