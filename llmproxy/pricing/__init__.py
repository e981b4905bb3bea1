"""What answers cost: usage priced with the genai-prices table and the ini's
overrides (tests: tests/unit/pricing/).

llmproxy/pricing/rates.py reads a model's prices once into a few numbers;
llmproxy/pricing/pricer.py picks the price of an answer (route, ``[prices]``,
table) and gives its event's ``cost`` object.  Nothing here fetches anything at
run time.
"""

from llmproxy.pricing.pricer import Pricer, build_pricer, price_problems

__all__ = ["Pricer", "build_pricer", "price_problems"]
