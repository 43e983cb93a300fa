-- wrk script: POST a unique ~1 KB formatted_webhook alert per request, report as one JSON line.
-- wrk -t2 -c64 -d8s -s bench/wrk/alerts.lua URL -- PREFIX
-- Each thread runs its own Lua state: `tid` (set in setup) and `counter` keep alert_uid unique.

local threads = {}
local counter = 0
local pad = string.rep("x", 700)

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

function init(args)
   prefix = args[1] or "wrk"
end

function request()
   counter = counter + 1
   local body = string.format(
      '{"alert_uid": "%s-%d-%d", "title": "Disk almost full on host%d", "state": "alerting", '
      .. '"link_to_upstream_details": "https://monitor.example.com/hosts/%d", '
      .. '"message": "/var is 96%% full (threshold 90%%) %s", "image_url": ""}',
      prefix, tid, counter, counter % 500, counter, pad)
   return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_RESULT {"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, '
      .. '"p50_us": %d, "p99_us": %d, "max_us": %d}\n',
      summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
      latency:percentile(50), latency:percentile(99), latency.max))
end
