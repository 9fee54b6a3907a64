"""Planning a run, above everything it plans: config resolution (`memory=auto`), validation
(`validate`), the pre-flight report of `--check` (`preflight`), the cost model (`cluster`,
`costmodel`, `search`) and an evaluation's plan (`eval`). It may import every package below it;
only the entry points (longtrain_launch) import it."""
