-- check: the same gate as consume, written nowhere. KEYS/ARGV: see gate().
local req, refusal = gate(false)
if refusal then
  return reply(req, refusal[1], refusal[2], refusal[3], req.cost, remaining(req), '')
end
return reply(req, 200, '', '', req.cost, remaining(req), '')
