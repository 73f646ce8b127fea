-- check: the same gate as consume, written nowhere.
local k = bind(KEYS, GATE_KEYS)
local a = bind(ARGV, GATE_ARGV)

local req, refusal = gate(k, a, false)
if refusal then
  return decision(req, {status = refusal[1], code = refusal[2], detail = refusal[3], cost = req.cost,
    remaining = remaining(req)})
end
return decision(req, {cost = req.cost, remaining = remaining(req)})
