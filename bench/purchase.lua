--[[
  wrk script: every request a purchase by a new honest buyer.

  Each request has its own user, device, Idempotency-Key and IP address, and the buyers spread
  over the 16,384 /24 subnets of the CGNAT space 100.64.0.0/10 (user n's /24 is n mod 16384),
  so the risk engine sees people, not a farm, and nobody is challenged.

  Environment: FG_PATH (the purchase path), FG_API_KEY (a channel key), FG_RUN (user prefix).
  Usage: FG_PATH=/v1/sales/s1/purchase FG_API_KEY=fgk_... wrk -t2 -c64 -d10s --latency \
           -s bench/purchase.lua http://127.0.0.1:8000
]]
local path = os.getenv("FG_PATH") or "/v1/sales/bench/purchase"
local auth = "Bearer " .. (os.getenv("FG_API_KEY") or "")
local run = os.getenv("FG_RUN") or tostring(os.time())
local threads = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

local counter = 0

function request()
  counter = counter + 1
  local n = counter * 16 + (tid or 0)   -- unique across up to 16 threads
  local s = n % 16384
  local ip = string.format("100.%d.%d.%d", 64 + math.floor(s / 256), s % 256,
                           1 + math.floor(n / 16384) % 254)
  local user = string.format("%s-%d", run, n)
  local body = string.format(
    '{"user_id":"%s","client_ip":"%s","device_id":"d-%s","user_agent":"wrk/4"}',
    user, ip, user)
  return wrk.format("POST", path, {
    ["Authorization"] = auth,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = user,
  }, body)
end
