-- check: the same gate as consume, written nowhere. With explain, the answer's `extra` is the
-- waterfall as evaluated (each layer, what it had, what it would give, the first that refused).
local k = bind(KEYS, GATE_KEYS)
local a = bind(ARGV, GATE_ARGV)

local req, refusal = gate(k, a, false)
local extra = req.explain and explained(req, refusal) or ''
if refusal then
  return decision(req, {status = refusal[1], code = refusal[2], detail = refusal[3], cost = req.cost,
    remaining = remaining(req), extra = extra})
end
return decision(req, {cost = req.cost, remaining = remaining(req), extra = extra,
  sources = req.explain and sources(req.steps) or ''})
