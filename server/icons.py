"""Icons for the server and each toolset: tiny SVG data URIs.

Every tool carries its toolset's icon in every ``tools/list``, so each is a single shape of a few
dozen bytes (``bench/tool_surface.py`` counts them).
"""

from __future__ import annotations

from urllib.parse import quote

import mcp_types as types

from datamachine_mcp.abilities.registry import TOOLSETS

# One 16x16 glyph per toolset: a shape that hints at what the toolset holds.
_SHAPES = {
    "server": "<path d='M2 2h12v4H2zm0 8h12v4H2z'/>",  # two stacked machine units
    "agents": "<circle cx='8' cy='5' r='3'/><path d='M2 15a6 6 0 0 1 12 0z'/>",  # a person
    "pipelines": "<path d='M1 6h14v4H1z'/>",  # a pipe
    "flows": "<path d='M2 2l12 6-12 6z'/>",  # play
    "jobs": "<path d='M2 2h12v12H2z'/>",  # a unit of work
    "processed-items": "<path d='M2 8l4 4 8-8-2-2-6 6-2-2z'/>",  # a check mark
    "logs": "<path d='M2 3h12v2H2zm0 4h12v2H2zm0 4h8v2H2z'/>",  # lines of text
    "chat": "<path d='M1 2h14v9H6l-4 3v-3H1z'/>",  # a speech bubble
    "settings": "<circle cx='8' cy='8' r='5'/>",  # a knob
    "system": "<path d='M8 1l7 7-7 7-7-7z'/>",  # a diamond
}


def _icon(shape: str) -> types.Icon:
    svg = f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16' fill='%234a6'>{shape}</svg>"
    # Percent-encode what a URI may not hold raw; the quotes are single so they need no escaping.
    return types.Icon(src="data:image/svg+xml," + quote(svg, safe="/:=' %.,-"))


SERVER_ICON = _icon(_SHAPES["server"])
TOOLSET_ICONS: dict[str, types.Icon] = {name: _icon(_SHAPES[name]) for name in TOOLSETS}
