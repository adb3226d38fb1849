"""Resource links in tool results: each ability names the output fields that identify a resource.

A client can open or @-mention ``datamachine://jobs/12`` from a run-flow result instead of calling
get-jobs again. Links are built from the ability's declaration (``links=``) and the resource
declarations; a link to a resource this process does not serve is left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import mcp_types as types

from datamachine_mcp.abilities.catalog import Declared
from datamachine_mcp.abilities.registry import Ability, link_targets
from datamachine_mcp.resources.registry import ResourceSpec


def link_specs(abilities: Iterable[Declared], resources: Iterable[ResourceSpec]) -> dict[str, ResourceSpec]:
    """The resource declaration behind each link template; a template no resource declares is a bug."""
    by_uri = {spec.uri: spec for spec in resources}
    out: dict[str, ResourceSpec] = {}
    for ability in abilities:
        for template in ability.links.values():
            if template not in by_uri:
                raise ValueError(f"{ability.slug} links to {template}, which no resource declares")
            out[template] = by_uri[template]
    return out


def resource_links(
    ability: Ability, output: Mapping[str, Any], specs: Mapping[str, ResourceSpec], served: Iterable[str]
) -> list[types.ResourceLink]:
    """Links for one successful call; ``served`` are the twins this process can read resources through."""
    readable = set(served)
    links = []
    for template, value in link_targets(ability, output):
        spec = specs.get(template)
        if spec is None or spec.twin not in readable or spec.template is None:
            continue
        (variable,) = spec.template.variable_names
        links.append(
            types.ResourceLink(
                uri=spec.template.expand({variable: str(value)}),
                name=f"{spec.name}-{value}",
                title=f"{spec.title} {value}",
                mime_type="application/json",
            )
        )
    return links
