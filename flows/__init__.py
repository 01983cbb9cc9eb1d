from alignflow.flows.gem import gem
from alignflow.flows.genies_eval import genies_eval
from alignflow.flows.pipeline import pipeline
from alignflow.flows.report import gem_markdown, genies_markdown, pipeline_markdown, self_improve_markdown
from alignflow.flows.self_improve import self_improve

FLOWS = {"self-improve": self_improve, "genies-eval": genies_eval, "gem": gem, "pipeline": pipeline}
# how the CLI prints each flow's returned summary
SUMMARIES = {
    "self-improve": self_improve_markdown,
    "genies-eval": genies_markdown,
    "gem": gem_markdown,
    "pipeline": pipeline_markdown,
}
