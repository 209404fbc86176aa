"""Block-diffusion SFT baseline on LLaDA-2.0-mini: the OPUT recipe without the on-policy half."""

from configs import oput_mini


def get_config():
  c = oput_mini.get_config()
  c.objective.oput = False  # plain block-diffusion SFT (MDLM): no duplication, no rollout
  return c
