"""The command line's overrides go before or after the options, as the docs write them."""

import pytest

from raclora_dist.cli import parse


def test_overrides_after_the_options_are_overrides_in_order():
    args = parse(["submit", "c.yaml", "train.lr=1e-4", "--address", "http://h:8265", "distributed.workers=4",
                  "--no-wait", "ray.storage_path=s3://b/ray"])
    assert args.address == "http://h:8265" and args.no_wait
    assert args.overrides == ["train.lr=1e-4", "distributed.workers=4", "ray.storage_path=s3://b/ray"]
    assert parse(["train", "c.yaml", "--resume", "raclora.links=4"]).overrides == ["raclora.links=4"]


@pytest.mark.parametrize("argv", [
    ["submit", "c.yaml", "--address", "http://h:8265", "--bogus"],  # an unknown option
    ["submit", "c.yaml", "--address", "http://h:8265", "stray"],  # not section.field=value
    ["status", "job-1", "--address", "http://h:8265", "train.lr=1"],  # a command without overrides
])
def test_anything_else_left_over_is_an_error_naming_it(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    assert f"unrecognized arguments: {argv[-1]}" in capsys.readouterr().err
