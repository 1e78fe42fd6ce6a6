"""Phase 2a: building trajectory datasets (`build.build_trajectories`) and inspecting them
(`inspect.inspect_trajectories`); the commands are `cmt.cli.build` and `cmt.cli.inspect`."""
