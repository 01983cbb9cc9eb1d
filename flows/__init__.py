from flows.self_improve import self_improve

FLOWS = {"self-improve": self_improve}
