"""lat_stim_2: lat_stim_1 with a stimulus around each response.

The text read is prompt + prefix + response + suffix, as upstream (the prefix follows the
Alpaca prompt's "### Response:" line): the prefix asks the reader to judge how far the
responder follows the instruction, and the suffix ends by leading into the probability that
it was followed, so the last token read is where that judgement is due. Everything else is
lat_stim_1 (lat_stim_1.py, direction_probe.py).

Departures: the default prefix and suffix are our own wording, with the same intent as
upstream's; setting ``prefix`` and ``suffix`` to upstream's sentences (GENIES
``src/interventions/lat_stim_2/train.py``) reproduces its stimulus exactly. The prefix and the
suffix are tokenized each on its own, like prompt and response (upstream tokenizes the joined
string); ``scoring.max_tokens``, by which the pairs stage drops long records, counts the pair
without the stimulus, so the stimulus never costs a training or test pair (upstream's lat_stim
scripts drop no pair for length).
"""

from __future__ import annotations

from pydantic import Field

from alignflow.genies.interventions.base import register
from alignflow.genies.interventions.lat_stim_1 import LatStim, LatStimConfig

UPSTREAM_NOTE = "; our wording: set upstream's exact sentence (GENIES lat_stim_2/train.py) to reproduce it"


class LatStimulusConfig(LatStimConfig):
    prefix: str = Field(
        "Judge how closely the responder sticks to the instruction below.\n",
        description="text between the prompt and the response" + UPSTREAM_NOTE,
    )
    suffix: str = Field(
        "\n\nThe chance that the responder did what the instruction asked is",
        description="text after the response, whose last token is read" + UPSTREAM_NOTE,
    )


@register("lat_stim_2", LatStimulusConfig)
class LatStimWithStimulus(LatStim):
    config: LatStimulusConfig

    @property
    def prefix(self) -> str:
        return self.config.prefix

    @property
    def suffix(self) -> str:
        return self.config.suffix
