"""Board: ESP32-S3 (ESP32_GENERIC_S3 firmware, e.g. DevKitC-1). Wi-Fi from
"network" in microtun.json; BOOT (GPIO0) is the safe-mode button: press it
within the boot window after a reset. The status LED is the RGB LED (WS2812)
on GPIO48 (DevKitC-1 v1.0; GPIO38 on v1.1; None if there is none).
With PSRAM (SPIRAM firmware) the heap is megabytes: no memory concerns.
"""
from machine import Pin

NAME = "esp32s3"
_PLATFORM = const("esp32")
_MACHINE_HAS = const("ESP32S3")
_MPY_ARCH = const("xtensawin")
_CRYPTOLIB = const(True)

NETWORK = "wifi"
SAFE_BUTTON = "BOOT (GPIO0)"
LED_PIN = 48
WDT_MAX_MS = None
FIRMWARE = {}

_button = Pin(0, Pin.IN, Pin.PULL_UP)
_np = None
if LED_PIN is not None:
    from neopixel import NeoPixel
    _np = NeoPixel(Pin(LED_PIN), 1)


def _setup(wlan):
    try:
        wlan.config(pm=wlan.PM_NONE)     # no modem sleep: see boards/esp32/board.py
    except (AttributeError, ValueError, OSError):
        pass


def network_up(net, timeout_ms, feed):
    from microtun_net import wifi_connect       # shared: firmware/microtun_net.py
    return wifi_connect(net, timeout_ms, feed, _setup)


def network_ok():
    import network
    return network.WLAN(network.STA_IF).isconnected()


def safe_button():
    return _button.value() == 0


def led(on):
    if _np is not None:
        _np[0] = (0, 12, 0) if on else (0, 0, 0)
        _np.write()


def temperature():
    import esp32
    return esp32.mcu_temperature()
