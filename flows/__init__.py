from alignflow.flows.gem import gem
from alignflow.flows.genies_eval import genies_eval
from alignflow.flows.pipeline import pipeline
from alignflow.flows.refeval_eval import refeval_eval, refeval_eval_markdown
from alignflow.flows.report import gem_markdown, genies_markdown, pipeline_markdown, self_improve_markdown
from alignflow.flows.self_improve import self_improve

FLOWS = {
    "self-improve": self_improve,
    "genies-eval": genies_eval,
    "gem": gem,
    "pipeline": pipeline,
    "refeval-eval": refeval_eval,
}
# how the CLI prints each flow's returned summary
SUMMARIES = {
    "self-improve": self_improve_markdown,
    "genies-eval": genies_markdown,
    "gem": gem_markdown,
    "pipeline": pipeline_markdown,
    "refeval-eval": refeval_eval_markdown,
}
