"""The example app's producer: one report job every second."""
import time

import kickq

kq = kickq.Kickq()
while True:
    kq.create("report", {"rows": [1, 2, 3]}, {"process_timeout": 300})
    time.sleep(1)
