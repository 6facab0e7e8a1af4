"""`cnnx train` and `cnnx evaluate` (placeholder until the training loop lands)."""
import click


@click.command()
def train():
    """Train a CNN; keep the best checkpoint under runs/<name>/."""
    raise click.ClickException("cnnx train is not built yet")


@click.command()
def evaluate():
    """Evaluate a checkpoint on a labelled image folder."""
    raise click.ClickException("cnnx evaluate is not built yet")
