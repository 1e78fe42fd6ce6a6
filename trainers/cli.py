"""cmt-train: one command per phase, all over the loop in cmt.trainers.loop."""
import click

from cmt.trainers.diffusion import command as diffusion_command
from cmt.trainers.mid import command as mid_command
from cmt.trainers.post import command as post_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Train a diffusion teacher (diffusion), mid-train a student on teacher trajectories (mid),
    or post-train it with ECT / ECD / MeanFlow (post)."""


main.add_command(diffusion_command)
main.add_command(mid_command)
main.add_command(post_command)

if __name__ == "__main__":
    main()
