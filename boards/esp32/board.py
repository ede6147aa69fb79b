"""Board: a generic ESP32 (ESP32_GENERIC firmware: DevKitC, WROOM/WROVER
modules). Wi-Fi from "network" in microtun.json; the BOOT button (GPIO0) is
the safe-mode button: press it within the boot window after a reset
(holding it *during* reset starts the ROM bootloader instead). Status LED on
GPIO2, found on many DevKit clones; set LED_PIN = None if yours has none.
"""
from machine import Pin

NAME = "esp32"
_PLATFORM = const("esp32")
_MACHINE_HAS = const("ESP32")
_MPY_ARCH = const("xtensawin")
_CRYPTOLIB = const(True)

NETWORK = "wifi"
SAFE_BUTTON = "BOOT (GPIO0)"
LED_PIN = 2
WDT_MAX_MS = None
FIRMWARE = {}

_button = Pin(0, Pin.IN, Pin.PULL_UP)
_led = Pin(LED_PIN, Pin.OUT, value=0) if LED_PIN is not None else None


def _setup(wlan):
    # Modem power save delays incoming UDP by up to a beacon interval
    # (~100 ms, more with DTIM); a tunnel endpoint wants it off.
    try:
        wlan.config(pm=wlan.PM_NONE)
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
    if _led is not None:
        _led.value(1 if on else 0)


def temperature():
    import esp32
    try:
        return esp32.mcu_temperature()
    except AttributeError:       # the original ESP32: degrees Fahrenheit, uncalibrated
        return round((esp32.raw_temperature() - 32) / 1.8, 1)
