"""The two renderers of a report: Markdown tables survive awkward cells, HTML escapes text and embeds images."""

from __future__ import annotations

import base64

from attnlab.report.render import Bullets, Callout, Heading, Image, Paragraph, Table, to_html, to_markdown


def test_markdown_of_every_block():
    blocks = [
        Heading(2, "Results"),
        Paragraph("plain **bold** `code`"),
        Callout("first\n\nsecond"),
        Bullets(("a", "b")),
        Table(("model", "note"), (("fmm_resnet20[merge=gate]", "a|b\nc"),)),
        Image("figures/x.png", "a caption"),
    ]
    assert to_markdown(blocks) == (
        "## Results\n\n"
        "plain **bold** `code`\n\n"
        "> first\n>\n> second\n\n"
        "- a\n- b\n\n"
        "| model | note |\n|---|---|\n| fmm_resnet20[merge=gate] | a\\|b c |\n\n"
        "![a caption](figures/x.png)\n\n*a caption*\n"
    )


def test_html_escapes_text_and_embeds_images(tmp_path):
    png = b"\x89PNG\r\n\x1a\nnot really"
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "x.png").write_bytes(png)
    page = to_html(
        [Paragraph("a <b> & **c** `d<e>`"), Table(("h",), (("<td>",),)), Image("figures/x.png", "cap")],
        tmp_path,
        "t <1>",
    )
    assert "<p>a &lt;b&gt; &amp; <strong>c</strong> <code>d&lt;e&gt;</code></p>" in page
    assert "<td>&lt;td&gt;</td>" in page and "<title>t &lt;1&gt;</title>" in page
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page
    assert "figures/x.png" not in page
