"""Guidance of a teacher (`cmt.guidance` through `cmt.teachers.resolve_teacher`)."""
import pytest
import torch
from conftest import TEACHER

from cmt.checkpoint import load_network, save_network
from cmt.errors import ArgumentError
from cmt.networks import build_network
from cmt.teachers import resolve_teacher


def test_classifier_free_guidance_is_refused_without_label_dropout(tmp_path):
    with pytest.raises(ArgumentError, match="unconditional guide") as error:
        resolve_teacher("mnist", guidance=2.0)   # the built-in teacher: no label dropout
    assert error.value.argument == "guidance"
    conditional = {**TEACHER, "label_dim": 3}
    for label_dropout, allowed in ((0.0, False), (0.1, True), (None, True)):
        path = save_network(tmp_path / f"net-{label_dropout}.safetensors", build_network(conditional),
                            extra_config={} if label_dropout is None else {"label_dropout": label_dropout})
        if allowed:
            assert resolve_teacher(str(path), guidance=2.0)[1]["guidance"]["kind"] == "classifier_free"
        else:
            with pytest.raises(ArgumentError, match="unconditional guide"):
                resolve_teacher(str(path), guidance=2.0)
    # An unconditional guide network gives classifier-free guidance to any conditional teacher.
    uncond = save_network(tmp_path / "uncond.safetensors", build_network(TEACHER))
    guided, identity = resolve_teacher(str(tmp_path / "net-0.0.safetensors"), guidance=2.0, guide_ckpt=str(uncond))
    assert identity["guidance"]["kind"] == "classifier_free" and identity["guidance"]["guide"]["path"] == str(uncond)
    x, sigma, labels = torch.randn(4, 2), torch.full((4,), 0.7), torch.eye(3)[[0, 1, 2, 0]]
    with torch.no_grad():
        teacher, weak = load_network(tmp_path / "net-0.0.safetensors"), load_network(uncond)
        torch.testing.assert_close(guided(x, sigma, labels), weak(x, sigma) + 2.0 * (teacher(x, sigma, labels)
                                                                                   - weak(x, sigma)))
